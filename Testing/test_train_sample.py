"""The bundled real CT, exported as a TotalSegmentator-layout folder, trains (a few steps)."""

from __future__ import annotations

import numpy as np
import pytest
from voila.data.io import read_image
from voila.data.layouts import discover
from voila.model.model_file import load_model
from voila.training.sample_dataset import main as sample_dataset_main


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample") / "totalseg"
    assert sample_dataset_main([str(root)]) == 0
    return root


def test_the_sample_dataset_is_the_example_ct_with_one_mask_per_totalsegmentator_class(sample, resources):
    dataset = discover(sample)
    assert dataset.layout == "totalsegmentator" and [c.case_id for c in dataset.cases] == ["example"]
    assert len(dataset.class_names) == 118
    labelmap, _ = read_image(resources / "SampleData/totalseg-example/example_seg_fast_force_split.nii.gz")
    liver, _ = read_image(sample / "example" / "segmentations" / "liver.nii.gz")
    assert liver.shape == labelmap.shape == (122, 101, 112)
    assert np.array_equal(liver > 0, labelmap == 5)  # TotalSegmentator class 5 is the liver


@pytest.mark.slow
def test_the_sample_dataset_trains_a_few_steps_and_exports_a_model(sample, tmp_path):
    import voila

    path = voila.train(
        {
            "data": [str(sample)],
            "out": str(tmp_path / "run"),
            "preset": "tiny",
            "patch_size": [24, 24, 24],
            "spacing": [6.0, 6.0, 6.0],
            "text_pretrained": "none",
            "device": "cpu",
            "batch_size": 1,
            "epochs": 1,
            "steps_per_epoch": 2,
        }
    )
    loaded = load_model(path)
    training = loaded.card["training"]
    assert training["optimizer_steps"] == 2 and training["validated_on_training_cases"]
    assert {"liver", "spleen", "kidney_left", "kidney_right", "aorta"} <= set(loaded.card["classes"])
    assert training["datasets"][0]["layout"] == "totalsegmentator"
