"""The segmentation engine and ``voila segment``: geometry, prompts, sidecar, cancel, errors."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from voila.cli import main
from voila.errors import Cancelled, InputImageError, PromptError
from voila.infer.segmenter import Segmenter


@pytest.fixture(scope="module")
def segmenter(tiny_model_path):
    return Segmenter.load(tiny_model_path, device="cpu")


def lps_copy(array, affine):
    """The same CT stored in LPS order: first two axes reversed, affine adjusted to match."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return array[::-1, ::-1, :].copy(), affine @ flip


def rotated(affine, degrees=20.0):
    angle = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return rotation @ affine


def test_labelmap_and_heatmap_lie_on_the_input_grid(segmenter, sample_ct):
    image, affine = sample_ct
    result = segmenter.segment(image, affine, ["liver", "spleen"])
    assert result.labelmap.shape == image.shape and result.labelmap.dtype == np.uint8
    assert result.heatmap.shape == image.shape and result.heatmap.dtype == np.float32
    assert 0.0 <= result.heatmap.min() and result.heatmap.max() <= 1.0
    assert np.array_equal(result.affine, affine)
    assert result.heatmap.max() > 0  # the CAS decoder really ran


def test_an_lps_stored_copy_gives_exactly_the_flipped_result(segmenter, sample_ct):
    image, affine = sample_ct
    reference = segmenter.segment(image, affine, ["liver"])
    flipped_image, flipped_affine = lps_copy(image, affine)
    flipped = segmenter.segment(flipped_image, flipped_affine, ["liver"])
    assert flipped.heatmap.shape == flipped_image.shape
    np.testing.assert_allclose(flipped.heatmap[::-1, ::-1, :], reference.heatmap, atol=1e-5)
    assert np.array_equal(flipped.labelmap[::-1, ::-1, :], reference.labelmap)


def test_an_oblique_grid_gets_its_result_on_its_own_grid(segmenter, sample_ct):
    image, affine = sample_ct
    reference = segmenter.segment(image, affine, ["liver"])
    oblique = segmenter.segment(image, rotated(affine), ["liver"])
    assert oblique.heatmap.shape == image.shape
    # the whole scan rotated with its grid: voxel for voxel the content is the same
    np.testing.assert_allclose(oblique.heatmap, reference.heatmap, atol=0.05)


def test_anisotropic_spacing_comes_back_on_the_thick_slice_grid(segmenter, sample_ct):
    image, affine = sample_ct
    thick_image = image[:, :, ::3].copy()
    thick_affine = affine.copy()
    thick_affine[:3, 2] *= 3
    result = segmenter.segment(thick_image, thick_affine, ["aorta"])
    assert result.labelmap.shape == thick_image.shape
    assert result.heatmap.shape == thick_image.shape


def test_an_untrained_model_reports_not_found_instead_of_inventing_organs(segmenter, sample_ct):
    image, affine = sample_ct
    result = segmenter.segment(image, affine, ["liver", "hello world"])
    assert not result.labelmap.any()
    liver, nonsense = result.prompts
    assert (liver.found, liver.voxels, liver.structure, liver.open_vocabulary) == (False, 0, "liver", False)
    assert nonsense.open_vocabulary and nonsense.structure is None and not nonsense.found
    assert nonsense.note


def test_prompts_are_matched_deduplicated_and_validated(segmenter):
    resolved, notes = segmenter.resolve_prompts(["Left Kidney", "kidney_left", "  ", "LIVER"])
    assert [p.structure.name for p in resolved] == ["kidney_left", "liver"]
    assert "duplicate" in notes[0]
    with pytest.raises(PromptError, match="no prompts"):
        segmenter.resolve_prompts(["", "   "])
    with pytest.raises(PromptError, match="characters long"):
        segmenter.resolve_prompts(["x" * 10_000])


def test_a_2d_image_is_refused_with_a_clear_message(segmenter):
    with pytest.raises(InputImageError, match="3-D"):
        segmenter.segment(np.zeros((64, 64), np.int16), np.eye(4), ["liver"])


def test_cancel_stops_between_windows(segmenter, sample_ct):
    image, affine = sample_ct
    cancel = threading.Event()
    calls = []

    def progress(fraction):
        calls.append(fraction)
        if fraction > 0.05:
            cancel.set()

    with pytest.raises(Cancelled):
        segmenter.segment(image, affine, ["liver"], progress=progress, cancel=cancel)
    assert calls and calls[-1] < 1.0


def test_cli_writes_labelmap_heatmap_preview_and_sidecar(tiny_model_path, sample_ct, tmp_path, capsys):
    from voila.data.io import read_image

    out = tmp_path / "seg.nrrd"
    ct = "Resources/SampleData/totalseg-example/example_ct.nii.gz"
    code = main(
        [
            "segment",
            ct,
            "-m",
            str(tiny_model_path),
            "-p",
            "liver, spleen",
            "-p",
            "hello world",
            "-o",
            str(out),
            "--heatmap",
            str(tmp_path / "heat.nii.gz"),
            "--preview",
            str(tmp_path / "p.png"),
            "--quiet",
        ]
    )
    assert code == 0
    labelmap, affine = read_image(out)
    np.testing.assert_allclose(affine, sample_ct[1], atol=1e-4)
    assert labelmap.shape == sample_ct[0].shape
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert [entry["prompt"] for entry in sidecar["labels"]] == ["liver", "spleen", "hello world"]
    assert [entry["label"] for entry in sidecar["labels"]] == [1, 2, 3]
    liver = sidecar["labels"][0]
    assert liver["snomed_code"] == "SCT:10200004" and len(liver["color"]) == 3
    assert {"confidence", "voxels", "volume_ml", "found", "open_vocabulary"} <= set(liver)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat.nii.gz", "p.png", "seg.json", "seg.nrrd"]
    assert "liver" in capsys.readouterr().out


def test_cli_error_is_one_line_nonzero_and_leaves_no_output(tiny_model_path, tmp_path, capsys):
    missing = tmp_path / "nope.nii.gz"
    code = main(
        ["segment", str(missing), "-m", str(tiny_model_path), "-p", "liver", "-o", str(tmp_path / "s.nii.gz")]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def world_centroid(mask, affine):
    return (affine @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]


@pytest.mark.parametrize("storage", ["RAS", "LPS"])
def test_left_kidney_comes_out_on_the_patients_left_whatever_the_storage_order(storage, sample_ct):
    """The shipped demo model on the bundled CT: in RAS world coordinates +x is the patient's right."""
    image, affine = sample_ct
    if storage == "LPS":
        image, affine = lps_copy(image, affine)
    result = Segmenter.load(device="cpu").segment(
        image, affine, ["left kidney", "right kidney"], heatmap=False, overlap=0.25
    )  # fewer windows: the side, not the quality, is under test
    left, right = result.prompts
    assert left.found and right.found, [p.note for p in result.prompts]
    left_x = world_centroid(result.labelmap == left.label, affine)[0]
    right_x = world_centroid(result.labelmap == right.label, affine)[0]
    assert left_x < 0 < right_x, (left_x, right_x)


def test_top_two_equals_softmax_and_sort():
    """The per-voxel winner, its softmax probability and the runner-up, without a softmax map."""
    import torch
    from voila.infer.sliding_window import top_two

    logits = torch.randn(5000, 118, generator=torch.Generator().manual_seed(0)) * 14.0
    winner, probability, runner_up = top_two(logits)
    reference = logits.softmax(dim=-1).topk(2, dim=-1)
    assert torch.equal(winner, reference.indices[:, 0]) and torch.equal(runner_up, reference.indices[:, 1])
    torch.testing.assert_close(probability, reference.values[:, 0], rtol=1e-5, atol=1e-6)
    single = top_two(logits[:, :1])
    assert torch.equal(single[0], torch.zeros(5000, dtype=torch.int64)) and bool((single[1] == 1).all())
