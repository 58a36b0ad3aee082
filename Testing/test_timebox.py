"""A time box on the CPU picks a patch with which an epoch fits (issue 15: one case, ten minutes,
hundreds of steps); ``--patch-size`` and a resumed run's checkpoint always win."""

from __future__ import annotations

import threading

import torch
import voila
from voila.data.phantoms import write_phantom_dataset
from voila.model.config import load_preset
from voila.model.model_file import read_model_card
from voila.training.timebox import SMALLEST_PATCH, candidate_edges, plan_patch


def test_candidate_patches_run_from_the_preset_down_in_steps_of_16():
    assert candidate_edges([96, 96, 96]) == [96, 80, 64, 48, 32]
    assert candidate_edges([128, 128, 96]) == [96, 80, 64, 48, 32]
    assert candidate_edges([40, 40, 40]) == [40, 32]
    assert candidate_edges([16, 16, 16]) == [SMALLEST_PATCH]


def test_a_short_box_takes_the_smallest_patch_a_long_one_the_presets_and_the_run_rng_is_untouched():
    config = load_preset("tiny")
    config.patch_size = [40, 40, 40]  # candidates 40³, 32³
    config.cas.channels, config.cas.latent_dim = [2, 2, 2, 2], 2  # the full-resolution CAS costs most
    torch.manual_seed(7)
    before = torch.get_rng_state()
    short = plan_patch(config, class_count=3, text_dim=8, batch_size=1, seconds=1.0, steps=250)
    assert torch.equal(torch.get_rng_state(), before), "the probe drew from the run's random stream"
    assert short.patch_size == [SMALLEST_PATCH] * 3
    assert list(short.measured) == [SMALLEST_PATCH]  # the larger ones were estimated out, not run
    assert 0 < short.seconds_per_step and short.steps_in_box < 250

    long = plan_patch(config, class_count=3, text_dim=8, batch_size=1, seconds=3600.0, steps=10)
    assert long.patch_size == list(config.patch_size)
    assert long.measured[40] * 10 <= 0.85 * 3600.0


def test_a_cpu_run_with_a_time_box_records_the_planned_patch_in_its_card_and_keeps_it_on_resume(tmp_path):
    data = write_phantom_dataset(tmp_path / "phantoms", n_cases=2, shape=(16, 16, 16), spacing=(6, 6, 6))
    settings = {
        "data": [str(data)],
        "out": str(tmp_path / "run"),
        "preset": "tiny",
        "spacing": [6.0],
        "text_pretrained": "none",
        "device": "cpu",
        "batch_size": 1,
        "steps_per_epoch": 250,
        "epochs": 2,
        "max_minutes": 0.05,  # 3 s: an epoch of 250 steps fits only at the smallest patch
        "val_windows": 2,
    }
    model = voila.train(settings)
    card = read_model_card(model)
    assert card["model"]["patch_size"] == [SMALLEST_PATCH] * 3
    log = (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert "time box: patch 32×32×32 instead of the preset's 48×48×48" in log

    stop = threading.Event()
    stop.set()  # one step, then a clean stop: enough to see the resumed patch
    voila.train(dict(settings, resume=True, max_minutes=None), stop=stop)  # no box: the preset's 48³
    assert "resumed at" in (tmp_path / "run" / "train.log").read_text(encoding="utf-8")
    assert read_model_card(model)["model"]["patch_size"] == [SMALLEST_PATCH] * 3
