"""A training run killed with SIGKILL and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from voila.data.phantoms import write_phantom_dataset

TRAIN_ARGS = [
    "--preset", "tiny", "--patch-size", "24", "--spacing", "4", "--text-pretrained", "none",
    "--device", "cpu", "--batch-size", "1", "--epochs", "3", "--steps-per-epoch", "3",
    "--checkpoint-every", "1", "--seed", "7",
]  # fmt: skip


def voila_train(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "voila",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        *TRAIN_ARGS,
        *extra,
    ]


def environment() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    data = write_phantom_dataset(tmp_path / "phantoms", n_cases=3, shape=(24, 24, 24), spacing=(4, 4, 4))
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"

    # the uninterrupted run goes alongside (each process has one thread; the machine has two)
    uninterrupted = subprocess.Popen(
        voila_train(data, straight),
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    victim = subprocess.Popen(
        voila_train(data, interrupted), env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = interrupted / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 150
    while not checkpoint.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, (
        f"the run ended before it could be killed: {victim.stderr.read().decode()[-2000:]}"
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] < 9, "the kill must land before the end of the run"
    assert (interrupted / ".voila-train.lock").exists(), "a killed run leaves its (now stale) lock behind"

    resumed = subprocess.run(
        voila_train(data, interrupted, "--resume"),
        env=environment(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at epoch" in resumed.stderr

    _, errors = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, errors[-3000:]

    final_a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    final_b = torch.load(interrupted / "checkpoints" / "last.pt", weights_only=True)
    assert final_a["global_step"] == final_b["global_step"] == 9
    assert final_a["model"].keys() == final_b["model"].keys()
    different = [k for k in final_a["model"] if not torch.equal(final_a["model"][k], final_b["model"][k])]
    assert not different, f"weights differ after resume: {different[:5]}"
    for key in ("exp_avg", "exp_avg_sq"):
        for index, entry in final_a["optimizer"]["state"].items():
            assert torch.equal(entry[key], final_b["optimizer"]["state"][index][key])

    model_a = load_file(str(straight / "model.safetensors"))
    model_b = load_file(str(interrupted / "model.safetensors"))
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    rows_b = (interrupted / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows_b[1:]] == ["0", "1", "2"], (
        "a resumed run keeps one metrics row per epoch"
    )
