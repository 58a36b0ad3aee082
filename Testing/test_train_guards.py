"""What training refuses, survives and reports: bad settings, NaN, busy or finished run folders,
corrupt cases, unwritable outputs; and the Python API's progress and clean stop."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import voila
from voila.cli import main as voila_cli
from voila.data.io import write_volume
from voila.data.phantoms import write_phantom_dataset
from voila.errors import ConfigError, DatasetError, OutputError, TrainingError
from voila.model.model_file import read_model_card
from voila.training.config import load_train_config
from voila.training.data import TrainingData
from voila.training.run_folder import RunLock
from voila.vocabulary import Vocabulary

FAST = {
    "preset": "tiny",
    "patch_size": [16, 16, 16],
    "spacing": [6.0, 6.0, 6.0],
    "text_pretrained": "none",
    "device": "cpu",
    "batch_size": 1,
    "steps_per_epoch": 2,
    "epochs": 1,
}
SIX_MM = np.diag([6.0, 6.0, 6.0, 1.0])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    return write_phantom_dataset(
        tmp_path_factory.mktemp("data") / "phantoms", n_cases=3, shape=(16, 16, 16), spacing=(6, 6, 6)
    )


@pytest.fixture(scope="module")
def finished_run(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    voila.train(dict(FAST, data=[str(phantoms)], out=str(out)))
    return out


# -- configuration ------------------------------------------------------------------------------
def test_an_unknown_setting_is_named_with_the_known_ones(phantoms):
    with pytest.raises(
        ConfigError, match=r"unknown training setting 'learning_rate'.*known settings: .*\blr\b"
    ):
        load_train_config({"data": [str(phantoms)], "learning_rate": 0.1})


def test_a_missing_data_path_says_to_check_it(tmp_path):
    with pytest.raises(ConfigError, match=r"training data .*nowhere does not exist; check the --data path"):
        load_train_config({"data": [str(tmp_path / "nowhere")]})


def test_no_data_at_all_says_to_pass_data():
    with pytest.raises(ConfigError, match=r"no training data given; pass --data"):
        load_train_config({})


def test_a_wrongly_typed_value_names_the_setting(phantoms):
    with pytest.raises(ConfigError, match=r"'epochs' has an invalid value 'many'"):
        load_train_config({"data": [str(phantoms)], "epochs": "many"})
    with pytest.raises(ConfigError, match=r"lr must be > 0, got -1"):
        load_train_config({"data": [str(phantoms)], "lr": -1})


def test_yaml_settings_are_overridden_by_flags_and_data_paths_are_relative_to_the_file(tmp_path, phantoms):
    (tmp_path / "data").symlink_to(phantoms)
    path = tmp_path / "train.yaml"
    path.write_text("data: [data]\nepochs: 7\nlr: 0.01\nspacing: 3\n")
    config = load_train_config(path, {"epochs": 2, "seed": None})
    assert config.data == [str(tmp_path / "data")]
    assert (config.epochs, config.lr, config.spacing, config.seed) == (2, 0.01, [3.0, 3.0, 3.0], 0)


def test_the_command_line_prints_one_line_for_a_bad_setting(tmp_path, capsys, phantoms):
    path = tmp_path / "train.yaml"
    path.write_text(f"data: [{phantoms}]\nbatchsize: 4\n")
    assert voila_cli(["train", str(path), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("voila train: error: unknown training setting 'batchsize'") and "\n" not in error


def test_an_empty_dataset_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        TrainingData.prepare([tmp_path / "empty"], _preprocessing(), Vocabulary.load())


def test_validation_cases_that_share_no_structure_with_training_are_refused(tmp_path):
    root = tmp_path / "disjoint"
    for case, structure in (("a", "liver"), ("b", "spleen")):
        ct = np.full((12, 12, 12), 40, dtype=np.int16)
        mask = np.zeros((12, 12, 12), dtype=np.uint8)
        mask[4:8, 4:8, 4:8] = 1
        (root / case / "segmentations").mkdir(parents=True)
        write_volume(root / case / "ct.nii.gz", ct, SIX_MM)
        write_volume(root / case / "segmentations" / f"{structure}.nii.gz", mask, SIX_MM)
    (root / "meta.csv").write_text("image_id;split\na;train\nb;val\n")
    with pytest.raises(ConfigError, match="share no labelled structure"):
        TrainingData.prepare([root], _preprocessing(), Vocabulary.load())


def test_label_names_map_to_the_vocabulary_and_unknown_names_become_free_text(tmp_path):
    root = tmp_path / "named"
    (root / "c" / "segmentations").mkdir(parents=True)
    ct = np.full((12, 12, 12), 40, dtype=np.int16)
    write_volume(root / "c" / "ct.nii.gz", ct, SIX_MM)
    for index, name in enumerate(("Liver", "left_kidney", "my_lesion")):
        mask = np.zeros((12, 12, 12), dtype=np.uint8)
        mask[index * 4 : index * 4 + 3, 2:6, 2:6] = 1
        write_volume(root / "c" / "segmentations" / f"{name}.nii.gz", mask, SIX_MM)
    data = TrainingData.prepare([root], _preprocessing(), Vocabulary.load())
    assert data.class_names == [
        "background",
        "kidney_left",
        "liver",
        "my lesion",
    ]  # vocabulary order, then free text
    assert data.class_texts[2] == "This region represents the my lesion."


def _preprocessing():
    from voila.data.preprocess import PreprocessingConfig

    return PreprocessingConfig(spacing=(6.0, 6.0, 6.0))


# -- run folders --------------------------------------------------------------------------------
def test_a_finished_run_folder_is_refused_without_resume(finished_run, phantoms):
    with pytest.raises(
        TrainingError, match=r"already holds a finished training run; use --resume .* another --out"
    ):
        voila.train(dict(FAST, data=[str(phantoms)], out=str(finished_run)))


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, phantoms):
    out = tmp_path / "busy"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".voila-train.lock").write_text(f"{other.pid} {os.uname().nodename}\n")
        with pytest.raises(
            TrainingError, match=rf"another training run \(pid {other.pid} .* choose another --out"
        ):
            voila.train(dict(FAST, data=[str(phantoms)], out=str(out)))
    finally:
        other.kill()
        other.wait()
    assert (out / ".voila-train.lock").read_text().split()[0] == str(other.pid), (
        "the other run's lock is untouched"
    )


def test_taking_the_run_lock_removes_half_written_files_of_a_killed_run_only(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: the writer SIGKILLed mid-checkpoint
    stale = out / "checkpoints" / f".last.pt.partial-{dead.pid}.pt"
    live = out / f".model.safetensors.partial-{os.getpid()}.safetensors"  # a writer still running
    kept = out / "checkpoints" / "last.pt"
    for path in (stale, live, kept):
        path.write_bytes(b"half")
    lock = RunLock(out)
    lock.acquire()
    try:
        assert not stale.exists()
        assert live.exists() and kept.exists()
    finally:
        lock.release()


def test_an_output_folder_that_cannot_be_created_raises_output_error(tmp_path, phantoms):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="choose another --out"):
        voila.train(dict(FAST, data=[str(phantoms)], out=str(blocker / "run")))


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(finished_run, phantoms):
    checkpoint = finished_run / "checkpoints" / "last.pt"
    with pytest.raises(
        TrainingError, match=r"loss became NaN/Inf .* last good checkpoint .*last\.pt is kept"
    ) as error:
        voila.train(dict(FAST, data=[str(phantoms)], out=str(finished_run), epochs=6, lr=1e38, resume=True))
    failing_step = int(re.search(r"step (\d+)", str(error.value)).group(1))
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] < failing_step
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (finished_run / ".voila-train.lock").exists(), "the lock is released after the failure"


# -- corrupt cases, progress, stop --------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    root = write_phantom_dataset(
        tmp_path_factory.mktemp("corrupt") / "phantoms", n_cases=4, shape=(16, 16, 16), spacing=(6, 6, 6)
    )
    broken = root / "phantom_001" / "ct.nii.gz"
    broken.write_bytes(gzip.compress(b"this is not a NIfTI header")[:40])
    out = tmp_path_factory.mktemp("runs") / "stopped"
    stop = threading.Event()
    reports = []

    def progress(report) -> None:
        reports.append(report)
        if report.phase == "train" and report.step >= 2:
            stop.set()

    path = voila.train(
        dict(FAST, data=[str(root)], out=str(out), epochs=5, steps_per_epoch=3), progress=progress, stop=stop
    )
    return path, out, reports


def test_a_corrupt_case_is_skipped_reported_and_the_run_goes_on(stopped_run):
    path, out, _ = stopped_run
    skipped = read_model_card(path)["training"]["skipped_cases"]
    assert [entry["case"] for entry in skipped] == ["phantoms/phantom_001"]
    assert "corrupt" in skipped[0]["reason"] or "cannot read" in skipped[0]["reason"]
    assert "skipping case phantoms/phantom_001" in (out / "train.log").read_text()


def test_the_python_api_reports_progress_and_a_stop_writes_checkpoint_and_model(stopped_run):
    path, out, reports = stopped_run
    first = reports[0]
    assert (first.epoch, first.step, first.total, first["phase"]) == (1, 1, 15, "train")
    assert first.loss > 0 and (first.eta is None or first.eta >= 0)
    assert reports[-1].phase == "stopped"
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["global_step"], state["epoch"], state["step_in_epoch"]) == (2, 0, 2)
    card = read_model_card(path)
    assert card["classes"][0] == "background" and "liver" in card["classes"]
    assert card["text_encoder"]["pretrained"] is None


def test_each_setting_is_declared_once_and_reaches_flags_sections_and_checks(phantoms, tmp_path, capsys):
    from voila.training.config import SECTIONS, SETTINGS

    with pytest.raises(SystemExit):
        voila_cli(["train", "--help"])
    help_text = capsys.readouterr().out
    for setting in SETTINGS:
        for flag in setting.flags:
            assert flag in help_text, flag
    sectioned = tmp_path / "sectioned.yaml"
    sectioned.write_text(
        f"data: {{data: [{phantoms}]}}\nmodel: {{preset: tiny, spacing: 3}}\noptim: {{lr: 0.02, epochs: 4}}\n"
    )
    flat = load_train_config(
        {"data": [str(phantoms)], "preset": "tiny", "spacing": 3, "lr": 0.02, "epochs": 4}
    )
    assert load_train_config(sectioned).to_dict() == flat.to_dict()
    assert list(flat.sections()) == list(SECTIONS)
    assert flat.sections()["optim"]["lr"] == 0.02
    misplaced = tmp_path / "misplaced.yaml"
    misplaced.write_text(f"data: [{phantoms}]\nmodel: {{lr: 0.02}}\n")
    with pytest.raises(ConfigError, match="'lr' belongs in section 'optim', not 'model'"):
        load_train_config(misplaced)
    with pytest.raises(ConfigError, match="patch_size must be >= 8"):
        load_train_config({"data": [str(phantoms)], "patch_size": 4})
    with pytest.raises(ConfigError, match="device must be"):
        load_train_config({"data": [str(phantoms)], "device": "gpu0"})
