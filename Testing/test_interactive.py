"""Interactive VOILA: encode once, then text, clicks and boxes from the stored tokens.

Real model (the shipped demo model) on a crop of the bundled real CT, so that a run is a few
seconds; geometry is checked for the CT as stored (RAS), an LPS-stored copy and an oblique grid.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from voila.cli import main
from voila.data.geometry import voxel_of
from voila.data.io import read_image, write_volume
from voila.errors import PromptError
from voila.infer.segmenter import Segmenter
from voila.infer.sliding_window import count_windows

CROP = (slice(20, 110), slice(20, 90), slice(60, 112))  # abdomen: liver, spleen, kidneys, aorta
OVERLAP = 0.25
LIVER, KIDNEY_LEFT = 5, 3  # TotalSegmentator labels of the bundled reference


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter.load(device="cpu")


@pytest.fixture(scope="module")
def volume(resources):
    """The cropped real CT, its reference labels and its affine (RAS storage, 3 mm)."""
    folder = resources / "SampleData" / "totalseg-example"
    ct, affine = read_image(folder / "example_ct.nii.gz")
    reference, _ = read_image(folder / "example_seg_fast_force_split.nii.gz")
    shifted = affine.copy()
    shifted[:3, 3] += affine[:3, :3] @ [s.start for s in CROP]
    return ct[CROP].copy(), reference[CROP].copy(), shifted


def as_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return array[::-1, ::-1, :].copy(), affine @ flip


ROTATION = np.eye(4)
ROTATION[1:3, 1:3] = [[np.cos(0.44), -np.sin(0.44)], [np.sin(0.44), np.cos(0.44)]]  # 25° about R-L

# Each way to hold the same scan: (array, affine, how world points move with it). The oblique one
# is the whole scan rotated in the world (its grid is oblique), so a click moves with it.
GRIDS = {
    "ras": lambda a, f: (a, f, np.eye(4)),
    "lps": lambda a, f: (*as_lps(a, f), np.eye(4)),
    "oblique": lambda a, f: (a, ROTATION @ f, ROTATION),
}


def moved(transform: np.ndarray, point) -> np.ndarray:
    return (transform @ np.array([*point, 1.0]))[:3]


def world(affine: np.ndarray, voxel) -> np.ndarray:
    return (affine @ np.array([*voxel, 1.0]))[:3]


def world_of_voxels(affine: np.ndarray, mask: np.ndarray) -> np.ndarray:
    where = np.argwhere(mask).astype(float)
    return (affine[:3, :3] @ where.T).T + affine[:3, 3]


@pytest.fixture(scope="module")
def liver_click(volume) -> np.ndarray:
    """A world point deep inside the reference liver (the voxel farthest from its surface)."""
    from scipy import ndimage

    _, reference, affine = volume
    depth = ndimage.distance_transform_edt(reference == LIVER)
    return world(affine, np.unravel_index(int(depth.argmax()), depth.shape))


def test_a_new_prompt_on_an_encoded_volume_gives_exactly_the_labels_of_the_one_shot_path(segmenter, volume):
    ct, _, affine = volume
    prompts = ["liver", "spleen", "left kidney", "my organ"]
    encoding = segmenter.encode(ct, affine, heatmap=True, overlap=OVERLAP)
    tokens, heatmap = encoding.encoded.tokens, encoding.encoded.heatmap
    bins = encoding.intensity_bins  # the demo model's review map reads each voxel's intensity bin
    assert bins is not None and bins.dtype == np.uint8
    assert encoding.nbytes == tokens.numel() * 2 + heatmap.numel() * 4 + encoding.body.size + bins.size
    first = encoding.segment(prompts)
    again = encoding.segment(["aorta", "liver"])
    one_shot = segmenter.segment(ct, affine, prompts, heatmap=True, overlap=OVERLAP)
    assert np.array_equal(first.labelmap, one_shot.labelmap)
    assert np.array_equal(first.heatmap, one_shot.heatmap)
    assert [p.volume_ml for p in first.prompts] == [p.volume_ml for p in one_shot.prompts]
    assert first.prompts[0].found and again.prompts[1].found
    liver_first = first.labelmap == first.prompts[0].label
    assert np.array_equal(liver_first, again.labelmap == again.prompts[1].label)


@pytest.mark.parametrize("grid", GRIDS)
def test_a_click_lands_on_the_voxel_under_it_whatever_the_grid(grid, volume, liver_click):
    ct, _, affine = volume
    array, grid_affine, transform = GRIDS[grid](ct, affine)
    click = moved(transform, liver_click)
    voxel = voxel_of(grid_affine, array.shape, click)
    assert voxel is not None
    assert np.linalg.norm(world(grid_affine, voxel) - click) <= 0.5 * np.sqrt(3) * 3.0 + 1e-6
    assert array[voxel] == ct[voxel_of(affine, ct.shape, liver_click)]  # the same voxel of the scan


@pytest.mark.parametrize("grid", GRIDS)
def test_a_click_and_any_name_segment_the_clicked_structure(grid, segmenter, volume, liver_click):
    ct, reference, affine = volume
    array, grid_affine, transform = GRIDS[grid](ct, affine)
    click = moved(transform, liver_click)
    result = segmenter.segment(
        array, grid_affine, [], points={"my organ": [(click, True)]}, heatmap=False, overlap=OVERLAP
    )
    (organ,) = result.prompts
    assert organ.found and organ.structure is None and "from your points" in organ.note
    mine = result.labelmap == organ.label
    assert mine[voxel_of(grid_affine, array.shape, click)], "the clicked voxel belongs to the result"
    if grid == "lps":
        mine = mine[::-1, ::-1, :]
    liver = reference == LIVER  # the storage differs, the voxels are the scan's: Dice on its grid
    dice = 2 * np.logical_and(mine, liver).sum() / (mine.sum() + liver.sum())
    assert dice > 0.6, dice


def test_an_excluding_click_carves_its_surroundings_out(segmenter, volume, liver_click):
    ct, reference, affine = volume
    encoding = segmenter.encode(ct, affine, overlap=OVERLAP)
    inside = encoding.segment([], points={"my organ": [(liver_click, True)]})
    (organ,) = inside.prompts
    liver_voxels = np.argwhere((inside.labelmap == organ.label) & (reference == LIVER))
    far = liver_voxels[
        np.argmax(np.linalg.norm(liver_voxels - np.argwhere(reference == LIVER).mean(0), axis=1))
    ]
    excluded = world(affine, far)
    carved = encoding.segment([], points={"my organ": [(liver_click, True), (excluded, False)]})
    assert inside.labelmap[tuple(far)] == organ.label and carved.labelmap[tuple(far)] == 0
    assert carved.prompts[0].voxels < organ.voxels
    # an edit where the user clicked: farther than the radius (+ a model voxel) nothing changes
    from voila.infer.encoding import NEGATIVE_CLICK_RADIUS_MM

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    distance = np.sqrt(sum(((axis - c) * d) ** 2 for axis, c, d in zip(np.indices(ct.shape), far, spacing)))
    away = distance > NEGATIVE_CLICK_RADIUS_MM + 2 * max(segmenter.preprocessing.spacing)
    changed = (inside.labelmap == organ.label) != (carved.labelmap == organ.label)
    assert changed.any() and not (changed & away).any()
    with pytest.raises(PromptError, match="only excluding points"):
        encoding.segment([], points={"my organ": [(excluded, False)]})
    with pytest.raises(PromptError, match="lies outside the image"):
        encoding.segment([], points={"my organ": [((9e3, 0.0, 0.0), True)]})


def test_an_excluding_click_never_acts_nearer_to_an_including_click_than_to_itself(
    segmenter, volume, liver_click
):
    ct, _, affine = volume
    encoding = segmenter.encode(ct, affine, overlap=OVERLAP)
    inside = voxel_of(affine, ct.shape, liver_click)
    beside = (inside[0] + 3, inside[1], inside[2])  # 9 mm away, well within the exclusion radius
    kept = encoding.segment(["liver"], points={"liver": [(liver_click, True)]})
    edited = encoding.segment(
        ["liver"], points={"liver": [(liver_click, True), (world(affine, beside), False)]}
    )
    assert edited.labelmap[beside] == 0 and kept.labelmap[inside] == edited.labelmap[inside] != 0
    # every voxel nearer to the including click than to the excluding one keeps its label
    grid = np.indices(ct.shape).reshape(3, -1).T
    nearer = (np.linalg.norm(grid - inside, axis=1) < np.linalg.norm(grid - beside, axis=1)).reshape(ct.shape)
    assert np.array_equal(kept.labelmap[nearer], edited.labelmap[nearer])


def test_an_including_click_on_what_the_text_found_keeps_it(segmenter, volume, liver_click):
    ct, _, affine = volume
    encoding = segmenter.encode(ct, affine, overlap=OVERLAP)
    text = encoding.segment(["liver"])
    clicked = encoding.segment(["liver"], points={"liver": [(liver_click, True)]})
    liver = text.labelmap == text.prompts[0].label
    assert liver[tuple(np.round(np.linalg.solve(affine, [*liver_click, 1.0])[:3]).astype(int))]
    # the same voxels, less any part not connected to the clicked one
    kept = clicked.labelmap == clicked.prompts[0].label
    assert not (kept & ~liver).any() and kept.sum() >= 0.95 * liver.sum()


def test_a_click_under_a_free_text_name_on_a_structure_the_model_knows_takes_that_structure(
    segmenter, volume, liver_click
):
    ct, _, affine = volume
    encoding = segmenter.encode(ct, affine, overlap=OVERLAP)
    text = encoding.segment(["liver"])
    named = encoding.segment([], points={"my organ": [(liver_click, True)]})
    liver = text.labelmap == text.prompts[0].label
    mine = named.labelmap == named.prompts[0].label
    # the model's own liver (its part that holds the click), under the user's name: no fat or muscle
    assert named.prompts[0].found and not (mine & ~liver).any() and mine.sum() >= 0.95 * liver.sum()
    # the free text did not take the liver from a run that asks for the liver too
    both = encoding.segment(["liver", "my organ"])
    assert np.array_equal(both.labelmap == both.prompts[0].label, liver)


@pytest.mark.parametrize("grid", GRIDS)
def test_a_box_keeps_its_prompt_inside_and_only_its_windows_run(grid, segmenter, volume):
    ct, reference, affine = volume
    array, grid_affine, transform = GRIDS[grid](ct, affine)
    kidney = world_of_voxels(transform @ affine, reference == KIDNEY_LEFT)
    box = (kidney.min(0) + [0, 0, 15.0], kidney.max(0))  # cuts the kidney's lower part off
    result = segmenter.segment(
        array, grid_affine, ["left kidney"], boxes={"left kidney": box}, overlap=OVERLAP
    )
    kept = world_of_voxels(grid_affine, result.labelmap == result.prompts[0].label)
    assert result.prompts[0].found and len(kept) > 50
    assert np.all(kept >= np.asarray(box[0]) - 1e-6) and np.all(kept <= np.asarray(box[1]) + 1e-6)
    encoding = segmenter.encode(array, grid_affine, overlap=OVERLAP, within=[box])
    full = count_windows(encoding.grid_shape, segmenter.patch_size, OVERLAP)
    assert encoding.encoded.windows < full


def test_zoom_out_finds_the_prompted_structures_extent(segmenter, volume):
    from voila.data.preprocess import preprocess_volume

    ct, reference, affine = volume
    grid = preprocess_volume(ct, affine, segmenter.preprocessing)
    boxes = segmenter.zoom_out(grid, ["liver", "left kidney"])
    liver = world_of_voxels(affine, reference == LIVER)
    low, high = np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
    covered = np.all((liver >= low) & (liver <= high), axis=1).mean()
    assert covered > 0.95, covered


def test_the_command_line_takes_points_boxes_and_a_scan_and_computes_no_unasked_heatmap(
    segmenter, volume, liver_click, tmp_path, capsys
):
    ct, _, affine = volume
    path = write_volume(tmp_path / "ct.nii.gz", ct, affine)
    point = ",".join(f"{v:.2f}" for v in liver_click)
    argv = [
        "segment",
        str(path),
        "--point",
        f"my organ: {point}",
        "-o",
        str(tmp_path / "seg.nii.gz"),
        "--quiet",
    ]
    assert main([*argv, "--scan", "full"]) == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "seg.json").read_text())
    assert sidecar["labels"][0]["prompt"] == "my organ" and sidecar["labels"][0]["found"]
    assert "heatmap_file" not in sidecar
    for bad in (["--point", "my organ 1,2,3"], ["--box", "liver: 1,2,3"], ["--point", "liver: a,b,c"]):
        code = main(["segment", str(path), "-o", str(tmp_path / "x.nii.gz"), "--quiet", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "PROMPT:" in err[0], err


def test_free_text_embeddings_are_kept_on_disk_so_a_new_process_needs_no_text_encoder(monkeypatch):
    import voila.infer.segmenter as segmenter_module

    first = Segmenter.load(device="cpu")
    resolved, _ = first.resolve_prompts(["a structure typed once"])
    tokens = torch.nn.functional.normalize(torch.randn(first.model.config.token_dim, 4, 4, 4), dim=0)
    before = first.class_embeddings(resolved, tokens)

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was built although the embedding is on disk")

    monkeypatch.setattr(segmenter_module, "TextEncoder", no_encoder)
    fresh = Segmenter.load(device="cpu")
    assert np.array_equal(fresh.class_embeddings(resolved, tokens).numpy(), before.numpy())
