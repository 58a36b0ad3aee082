"""`voila evaluate`: metrics against hand-computed cases, the TotalSegmentator protocol, the CLI."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from voila.cli import main
from voila.commands.evaluate import parse_classes
from voila.data.geometry import voxel_spacing
from voila.data.io import write_volume
from voila.errors import InputImageError
from voila.evaluate import evaluate
from voila.evaluate.metrics import (
    compute_metrics,
    dice,
    hd95,
    normalized_surface_dice,
    surface_distances,
)
from voila.vocabulary import Structure, Vocabulary

ANISOTROPIC = (2.0, 0.7, 1.3)


def cube(shape=(24, 24, 24), start=(6, 6, 6), size=10, shift=(0, 0, 0)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s + d, s + d + size) for s, d in zip(start, shift))] = True
    return mask


def test_identical_cubes_score_dice_1_nsd_1_hd95_0():
    a = cube()
    metrics = compute_metrics(a, a.copy(), ANISOTROPIC, tolerance_mm=0.0)
    assert (metrics.dice, metrics.nsd, metrics.hd95_mm) == (1.0, 1.0, 0.0)
    assert metrics.ref_voxels == metrics.pred_voxels == 1000


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_cube_offset_by_k_voxels_has_hd95_of_k_times_the_spacing_along_that_axis(axis, k):
    shift = [0, 0, 0]
    shift[axis] = k
    ref, pred = cube(), cube(shift=tuple(shift))
    assert hd95(pred, ref, ANISOTROPIC) == pytest.approx(k * ANISOTROPIC[axis])
    assert dice(pred, ref) == pytest.approx((10 - k) / 10)


def test_two_voxel_slab_shifted_by_one_voxel_has_dice_one_half_exactly():
    ref = np.zeros((12, 6, 6), dtype=bool)
    ref[4:6] = True
    pred = np.roll(ref, 1, axis=0)
    assert dice(pred, ref) == 0.5
    assert hd95(pred, ref, (1.5, 1.0, 1.0)) == pytest.approx(1.5)


def test_nsd_is_1_when_the_shift_is_within_tolerance_and_below_1_beyond_it():
    ref, pred = cube(), cube(shift=(2, 0, 0))  # 2 voxels of 1 mm
    spacing = (1.0, 1.0, 1.0)
    assert normalized_surface_dice(pred, ref, spacing, tolerance_mm=2.0) == 1.0
    beyond = normalized_surface_dice(pred, ref, spacing, tolerance_mm=1.5)
    # The two end faces (1/6 of each surface) are 2 mm from any surface of the other cube.
    assert 0.5 < beyond <= 5 / 6 + 1e-9


def test_nsd_of_a_cube_inside_a_one_voxel_larger_cube_is_0_below_1_mm_and_1_above_sqrt3_mm():
    inner, outer = cube(size=10), cube(start=(5, 5, 5), size=12)
    distances = surface_distances(outer, inner, (1.0, 1.0, 1.0))
    assert distances.ref_to_pred.min() == pytest.approx(1.0)
    assert normalized_surface_dice(outer, inner, (1.0, 1.0, 1.0), tolerance_mm=0.99) == 0.0
    assert normalized_surface_dice(outer, inner, (1.0, 1.0, 1.0), tolerance_mm=1.74) == 1.0


def test_an_empty_prediction_scores_0_and_has_an_infinite_hd95_and_two_empty_masks_are_undefined():
    ref, empty = cube(), np.zeros((24, 24, 24), dtype=bool)
    missed = compute_metrics(empty, ref, ANISOTROPIC)
    assert (missed.dice, missed.nsd, missed.hd95_mm) == (0.0, 0.0, math.inf)
    nothing = compute_metrics(empty, empty, ANISOTROPIC)
    assert all(math.isnan(v) for v in (nothing.dice, nothing.nsd, nothing.hd95_mm))


def test_spacing_comes_from_the_affine_columns_even_when_axes_are_permuted_and_oblique():
    rotation = np.array([[0.0, 0.0, 1.0], [np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.array([2.5, 0.8, 0.6])
    assert tuple(voxel_spacing(affine)) == pytest.approx((2.5, 0.8, 0.6))


def test_class_arguments_are_names_or_label_pairs_but_not_both():
    assert parse_classes(["liver", "spleen"]) == ["liver", "spleen"]
    assert parse_classes(["1=liver", "2=left kidney"]) == {1: "liver", 2: "left kidney"}
    with pytest.raises(InputImageError, match="mixes"):
        parse_classes(["1=liver", "spleen"])


@pytest.fixture
def vocabulary(tmp_path, monkeypatch) -> Vocabulary:
    """A three-structure vocabulary with TotalSegmentator indices, served as the shipped one."""
    structures = [
        Structure("spleen", 1, "spleen"),
        Structure("kidney_left", 3, "left kidney", synonyms=("left kidney",)),
        Structure("liver", 5, "liver"),
    ]
    vocabulary = Vocabulary(structures)
    resources = tmp_path / "Resources"
    (resources / "Vocabulary").mkdir(parents=True)
    (resources / "Vocabulary" / "voila_vocabulary.json").write_text(json.dumps(vocabulary.to_dict()))
    monkeypatch.setenv("VOILA_RESOURCES", str(resources))
    return vocabulary


AFFINE = np.diag([0.8, 0.8, 2.0, 1.0])


def labelmap(**masks_by_label: np.ndarray) -> np.ndarray:
    out = np.zeros((24, 24, 24), dtype=np.uint8)
    for label, mask in masks_by_label.items():
        out[mask] = int(label.lstrip("v"))
    return out


def test_cli_scores_folders_of_labelmaps_with_sidecars_by_the_totalsegmentator_protocol(
    tmp_path, vocabulary, capsys
):
    slab = np.zeros((24, 24, 24), dtype=bool)
    slab[2:20, 2:20, 4:6] = True
    kidney = cube(start=(12, 12, 12), size=6)
    liver = cube(start=(1, 1, 14), size=4)
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "report"
    ref_dir.mkdir()
    pred_dir.mkdir()
    # Reference: TotalSegmentator indices (spleen 1, kidney_left 3, liver 5), no sidecar.
    write_volume(ref_dir / "case1.nii.gz", labelmap(v1=slab, v3=kidney), AFFINE)
    write_volume(ref_dir / "case2.nii.gz", labelmap(v1=slab, v3=kidney, v5=liver), AFFINE)
    # Prediction: 1 = kidney, 2 = spleen as `voila segment` names them; case2 misses the kidney.
    sidecar = {
        "labels": [
            {"label": 1, "prompt": "left kidney", "structure": "kidney_left"},
            {"label": 2, "prompt": "Spleen", "structure": None},
        ]
    }
    write_volume(pred_dir / "case1.nii.gz", labelmap(v1=kidney, v2=np.roll(slab, 1, axis=2)), AFFINE)
    (pred_dir / "case1.json").write_text(json.dumps(sidecar))
    write_volume(pred_dir / "case2.nii.gz", labelmap(v2=slab), AFFINE)
    (pred_dir / "case2.nii.gz.json").write_text(json.dumps(sidecar))

    code = main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "-o", str(out)])

    assert code == 0
    printed = capsys.readouterr().out
    assert "| spleen | 0.7500 |" in printed and "| kidney_left | 0.5000 |" in printed
    with open(out / "metrics_per_case.csv", newline="") as handle:
        rows = {(r["case"], r["class"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {
        ("case1", "spleen"),
        ("case1", "kidney_left"),
        ("case2", "spleen"),
        ("case2", "kidney_left"),
    }
    assert float(rows["case1", "spleen"]["dice"]) == 0.5
    assert float(rows["case1", "spleen"]["hd95_mm"]) == pytest.approx(2.0)  # one 2 mm voxel
    assert float(rows["case1", "kidney_left"]["dice"]) == 1.0
    missed = rows["case2", "kidney_left"]
    assert (float(missed["dice"]), float(missed["nsd"]), missed["hd95_mm"]) == (0.0, 0.0, "nan")
    assert (int(missed["ref_voxels"]), int(missed["pred_voxels"])) == (216, 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"]["spleen"]["dice"] == pytest.approx(0.75)
    assert summary["classes"]["kidney_left"] == {
        "dice": 0.5, "nsd": 0.5, "hd95_mm": 0.0, "n_cases": 2, "n_missed": 1,
    }  # fmt: skip
    assert summary["mean"]["dice"] == pytest.approx(0.625)
    assert summary["mean"]["n_classes"] == 2  # liver: not predicted, so not in the default classes
    assert "| **mean over 2 classes** | **0.6250** |" in (out / "summary.md").read_text()
    assert (out / "boxplots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if ".partial-" in p.name]


def test_totalsegmentator_mask_folders_are_matched_to_a_labelmap_named_with_label_pairs(tmp_path, vocabulary):
    liver, spleen = cube(start=(2, 2, 2), size=8), cube(start=(12, 12, 12), size=8)
    masks = tmp_path / "dataset" / "s0011" / "segmentations"
    masks.mkdir(parents=True)
    write_volume(masks / "liver.nii.gz", liver.astype(np.uint8), AFFINE)
    write_volume(masks / "spleen.nii.gz", spleen.astype(np.uint8), AFFINE)
    write_volume(masks / "kidney_left.nii.gz", np.zeros_like(liver, dtype=np.uint8), AFFINE)
    prediction = tmp_path / "prediction.nii.gz"
    write_volume(prediction, labelmap(v1=liver, v2=np.roll(spleen, 2, axis=0)), AFFINE)

    report = evaluate(prediction, tmp_path / "dataset", classes={1: "liver", 2: "spleen", 3: "left kidney"})

    assert report.cases == ("s0011",)
    assert [c.name for c in report.classes] == ["liver", "spleen"]
    assert report.not_scored == ("kidney_left",)  # empty in the reference: excluded
    spleen_row = report.rows[1]
    assert spleen_row.dice == pytest.approx(0.75)
    assert spleen_row.hd95_mm == pytest.approx(2 * 0.8)
    assert spleen_row.nsd == 1.0  # 1.6 mm shift, 3 mm tolerance

    # TotalSegmentator's own output folder (masks named after structures) as the prediction.
    ts_output = tmp_path / "ts_output"
    ts_output.mkdir()
    write_volume(ts_output / "spleen.nii.gz", spleen.astype(np.uint8), AFFINE)
    by_masks = evaluate(ts_output, masks)
    assert [(c.name, c.dice, c.n_cases) for c in by_masks.classes] == [("spleen", 1.0, 1)]


@pytest.mark.parametrize(
    "affine, shape, message",
    [
        (np.diag([0.8, 0.8, 2.5, 1.0]), (24, 24, 24), "different geometry"),
        (AFFINE, (24, 24, 20), "has shape"),
    ],
)
def test_predictions_on_another_grid_are_refused_with_advice_to_resample(
    tmp_path, vocabulary, capsys, affine, shape, message
):
    write_volume(tmp_path / "ref.nii.gz", labelmap(v1=cube(size=6)), AFFINE)
    write_volume(tmp_path / "pred.nii.gz", np.zeros(shape, dtype=np.uint8), affine)

    code = main(["evaluate", "--pred", str(tmp_path / "pred.nii.gz"), "--ref", str(tmp_path / "ref.nii.gz")])

    error = capsys.readouterr().err
    assert code == 2
    assert message in error and "resample the prediction onto the reference grid" in error


def test_a_prediction_without_a_reference_case_is_an_error(tmp_path, vocabulary):
    for folder, case in (("ref", "a"), ("ref", "b"), ("pred", "a"), ("pred", "c")):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_volume(tmp_path / folder / f"{case}.nii.gz", labelmap(v1=cube()), AFFINE)
    with pytest.raises(InputImageError, match="no reference for predicted case"):
        evaluate(tmp_path / "pred", tmp_path / "ref")
