"""Synthetic CT phantoms: realistic HU, RAS anatomy (as in the bundled real CT), TotalSegmentator layout."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from voila.data.io import read_image
from voila.data.layouts import discover, load_case_label
from voila.data.phantoms import STRUCTURES, make_phantom, write_phantom_dataset


def _centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_left_structures_lie_on_the_patients_left_at_smaller_ras_x(seed):
    _, labels, affine = make_phantom(seed=seed)
    x = {
        name: _centroid_ras(labels[name], affine)[0]
        for name in ("kidney_left", "kidney_right", "spleen", "liver")
    }
    assert x["kidney_left"] < x["kidney_right"]
    assert x["spleen"] < x["liver"]


def test_the_phantom_laterality_matches_the_bundled_real_ct(resources):
    masks = resources / "SampleData" / "totalseg-example" / "example_seg_fast"
    x = {}
    for name in ("kidney_left", "kidney_right", "spleen", "liver"):
        mask, affine = read_image(masks / f"{name}.nii.gz")
        x[name] = _centroid_ras(mask > 0, affine)[0]
    assert x["kidney_left"] < x["kidney_right"] and x["spleen"] < x["liver"]


def test_hounsfield_values_are_realistic():
    ct, labels, _ = make_phantom(shape=(64, 64, 64), seed=4)
    assert ct.dtype == np.int16
    expected = {"liver": 100, "spleen": 110, "kidney_left": 150, "kidney_right": 150, "aorta": 170}
    for name, hu in expected.items():
        assert abs(np.median(ct[labels[name]]) - hu) < 10, name
    assert np.median(ct[labels["vertebrae_L2"]]) > 500
    body = np.any([labels[name] for name in STRUCTURES], axis=0)
    assert np.median(ct[0, 0, :]) < -900  # the corner of the field of view is air
    around = ct[~body & (ct > -500)]
    assert -200 < np.median(around) < -50  # mostly fat around the organs (subcutaneous, visceral)
    assert np.mean(np.abs(around - 50) < 25) > 0.05  # and an abdominal muscle wall
    assert 5 < np.std(ct[labels["liver"]]) < 25  # noisy like a real scan


def test_structures_are_disjoint_present_and_the_gallbladder_touches_the_liver():
    _, labels, _ = make_phantom(seed=7)
    assert set(labels) == set(STRUCTURES)
    assert all(labels[name].sum() > 50 for name in STRUCTURES)
    assert np.sum([mask.astype(int) for mask in labels.values()], axis=0).max() == 1
    assert (ndimage.binary_dilation(labels["gallbladder"]) & labels["liver"]).any()


def test_phantoms_are_deterministic_given_the_seed_and_vary_between_seeds():
    ct_a, labels_a, affine_a = make_phantom(shape=(40, 36, 44), spacing=(2.0, 2.0, 2.5), seed=11)
    ct_b, labels_b, affine_b = make_phantom(shape=(40, 36, 44), spacing=(2.0, 2.0, 2.5), seed=11)
    np.testing.assert_array_equal(ct_a, ct_b)
    assert all(np.array_equal(labels_a[name], labels_b[name]) for name in STRUCTURES)
    np.testing.assert_array_equal(affine_a, affine_b)
    assert ct_a.shape == (40, 36, 44) and np.allclose(np.diag(affine_a)[:3], (2.0, 2.0, 2.5))
    ct_c, labels_c, _ = make_phantom(shape=(40, 36, 44), spacing=(2.0, 2.0, 2.5), seed=12)
    assert not np.array_equal(labels_a["liver"], labels_c["liver"])


def test_phantom_dataset_is_written_in_the_totalsegmentator_layout(tmp_path):
    root = write_phantom_dataset(tmp_path / "phantoms", n_cases=4, shape=(32, 32, 32), seed=3)
    assert (root / "meta.csv").read_text().splitlines()[0] == "image_id;split"
    dataset = discover(root)
    assert dataset.layout == "totalsegmentator"
    assert dataset.class_names == ["background", *sorted(STRUCTURES)]
    assert [case.split for case in dataset.cases] == ["train", "train", "train", "val"]
    labelmap, annotated = load_case_label(dataset.cases[1], dataset.class_names)
    assert sorted(annotated) == sorted(STRUCTURES)
    ct, labels, affine = make_phantom((32, 32, 32), seed=3 * 100_003 + 1)
    image, image_affine = read_image(dataset.cases[1].image)
    np.testing.assert_array_equal(image, ct)
    np.testing.assert_allclose(image_affine, affine)
    np.testing.assert_array_equal(labelmap == dataset.class_names.index("liver"), labels["liver"])
    assert not list(root.rglob(".*partial*"))
