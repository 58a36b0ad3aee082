"""``torchrun --nproc_per_node 2`` on the CPU (gloo) trains with DistributedDataParallel and exports a valid model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from voila.data.phantoms import write_phantom_dataset
from voila.model.model_file import load_model


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_trains_and_exports_a_valid_model(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    data = write_phantom_dataset(tmp_path / "phantoms", n_cases=4, shape=(32, 32, 32), spacing=(3, 3, 3))
    out = tmp_path / "ddp"
    command = [
        torchrun, "--standalone", "--nproc_per_node", "2", "-m", "voila", "train",
        "--data", str(data), "--out", str(out), "--preset", "tiny", "--patch-size", "24", "--spacing", "3",
        "--text-pretrained", "none", "--device", "cpu", "--batch-size", "1", "--epochs", "2",
        "--steps-per-epoch", "2",
    ]  # fmt: skip
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 process(es)" in result.stderr

    loaded = load_model(out / "model.safetensors")
    assert loaded.card["training"]["processes"] == 2
    assert loaded.card["training"]["optimizer_steps"] == 4
    assert "liver" in loaded.card["classes"] and len(loaded.text_cache) == len(loaded.card["classes"]) - 1
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert len(state["rng"]) == 2, "each process's random state is kept for --resume"
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    assert (out / "curves.png").stat().st_size > 0 and (out / "validation.png").stat().st_size > 0
