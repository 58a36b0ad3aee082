"""Dataset discovery: TotalSegmentator folders, MONAI/Decathlon datalists, nnU-Net raw folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from voila.data.io import write_volume
from voila.data.layouts import discover, load_case_label
from voila.errors import DatasetError

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (6, 5, 4)


def _ct(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 400, size=SHAPE).astype(np.int16)


def _box(*slices) -> np.ndarray:
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[slices] = 1
    return mask


def _totalsegmentator(root, meta="image_id;split\ns0001;train\ns0002;test\n"):
    """Case s0001 has liver and spleen masks; s0002 has liver and an empty kidney_left, no spleen."""
    masks = {
        "s0001": {"liver": _box(slice(0, 3)), "spleen": _box(slice(4, 6))},
        "s0002": {"liver": _box(slice(1, 4)), "kidney_left": np.zeros(SHAPE, np.uint8)},
    }
    for number, (case, structures) in enumerate(masks.items()):
        (root / case / "segmentations").mkdir(parents=True)
        write_volume(root / case / "ct.nii.gz", _ct(number), AFFINE)
        for name, mask in structures.items():
            write_volume(root / case / "segmentations" / f"{name}.nii.gz", mask, AFFINE)
    if meta is not None:
        (root / "meta.csv").write_text(meta)
    return root


def test_totalsegmentator_folder_is_discovered_with_splits_and_class_names(tmp_path):
    dataset = discover(_totalsegmentator(tmp_path / "ts"))
    assert dataset.layout == "totalsegmentator" and dataset.name == "ts"
    assert dataset.class_names == ["background", "kidney_left", "liver", "spleen"]
    assert [(case.case_id, case.split) for case in dataset.cases] == [("s0001", "train"), ("s0002", "test")]
    assert dataset.cases[0].label is None and set(dataset.cases[0].masks) == {"liver", "spleen"}


def test_totalsegmentator_meta_csv_may_use_commas_and_is_optional(tmp_path):
    dataset = discover(_totalsegmentator(tmp_path / "a", meta="image_id,split\ns0001,val\n"))
    assert [case.split for case in dataset.cases] == ["val", "train"]
    dataset = discover(_totalsegmentator(tmp_path / "b", meta=None))
    assert [case.split for case in dataset.cases] == ["train", "train"]


def test_per_structure_masks_become_one_labelmap_with_the_annotated_names(tmp_path):
    dataset = discover(_totalsegmentator(tmp_path / "ts"))
    names = dataset.class_names
    labelmap, annotated = load_case_label(dataset.cases[0], names)
    assert labelmap.shape == SHAPE and labelmap.dtype == np.uint8
    assert (labelmap[0:3] == names.index("liver")).all() and (labelmap[4:6] == names.index("spleen")).all()
    assert not labelmap[3].any()
    assert annotated == ["liver", "spleen"]
    # An empty mask file still means "annotated: absent"; a missing file means "not annotated".
    _, annotated = load_case_label(dataset.cases[1], names)
    assert annotated == ["kidney_left", "liver"]


def test_a_mask_on_another_grid_is_refused(tmp_path):
    root = _totalsegmentator(tmp_path / "ts")
    write_volume(root / "s0001" / "segmentations" / "liver.nii.gz", np.zeros((3, 3, 3), np.uint8), AFFINE)
    dataset = discover(root)
    with pytest.raises(DatasetError, match="not on the grid"):
        load_case_label(dataset.cases[0], dataset.class_names)


def _labelled_pairs(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for number, name in enumerate(names):
        write_volume(folder / f"{name}_ct.nii.gz", _ct(number), AFFINE)
        labels = np.zeros(SHAPE, np.uint8)
        labels[:2], labels[3:] = 1, 2
        write_volume(folder / f"{name}_seg.nii.gz", labels, AFFINE)


def test_decathlon_datalist_with_relative_paths(tmp_path):
    _labelled_pairs(tmp_path / "data", ["a", "b", "c"])
    datalist = {
        "labels": {"0": "background", "1": "liver", "2": "spleen"},
        "training": [{"image": f"data/{n}_ct.nii.gz", "label": f"data/{n}_seg.nii.gz"} for n in "ab"],
        "validation": [{"image": "data/c_ct.nii.gz", "label": "data/c_seg.nii.gz"}],
        "test": ["data/c_ct.nii.gz"],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    dataset = discover(tmp_path / "datalist.json")
    assert dataset.layout == "datalist" and dataset.class_names == ["background", "liver", "spleen"]
    assert [(c.case_id, c.split) for c in dataset.cases] == [
        ("a_ct", "train"),
        ("b_ct", "train"),
        ("c_ct", "val"),
        ("c_ct", "test"),
    ]
    assert dataset.cases[3].label is None
    labelmap, annotated = load_case_label(dataset.cases[0], dataset.class_names)
    assert set(np.unique(labelmap)) == {0, 1, 2} and annotated == ["liver", "spleen"]


def test_datalist_with_dataroot_and_folds(tmp_path):
    _labelled_pairs(tmp_path / "images", ["a", "b"])
    datalist = {
        "dataroot": str(tmp_path / "images"),
        "labels": {"1": "liver", "2": "spleen"},
        "training": [
            {"image": f"{n}_ct.nii.gz", "label": f"{n}_seg.nii.gz", "fold": fold}
            for n, fold in (("a", 1), ("b", 0))
        ],
    }
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "fold.json").write_text(json.dumps(datalist))
    dataset = discover(tmp_path / "lists" / "fold.json")
    assert dataset.root == tmp_path / "images"
    assert [c.split for c in dataset.cases] == ["train", "val"]


def test_datalist_problems_are_reported_clearly(tmp_path):
    _labelled_pairs(tmp_path, ["a"])
    entry = {"image": "a_ct.nii.gz", "label": "a_seg.nii.gz"}
    for content, message in (
        ({"training": [entry]}, "no 'labels' mapping"),
        (
            {"training": [{"image": "zz.nii.gz", "label": "a_seg.nii.gz"}], "labels": {"1": "x"}},
            "does not exist",
        ),
        ({"training": [entry], "labels": {"1": "x", "3": "y"}}, "without gaps"),
        ({"foo": 1}, "neither"),
    ):
        (tmp_path / "list.json").write_text(json.dumps(content))
        with pytest.raises(DatasetError, match=message):
            discover(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DatasetError, match="fix the JSON"):
        discover(tmp_path / "broken.json")


def _nnunet(root, channels=None):
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    for number, case in enumerate(("liver_001", "liver_002")):
        write_volume(root / "imagesTr" / f"{case}_0000.nii.gz", _ct(number), AFFINE)
        write_volume(root / "labelsTr" / f"{case}.nii.gz", _box(slice(0, 2)) * 2, AFFINE)
    write_volume(root / "imagesTs" / "liver_100_0000.nii.gz", _ct(5), AFFINE)
    content = {
        "channel_names": channels or {"0": "CT"},
        "labels": {"background": 0, "liver": 1, "liver_tumor": 2},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(content))
    return root


def test_nnunet_raw_folder_is_discovered(tmp_path):
    dataset = discover(_nnunet(tmp_path / "Dataset003_Liver"))
    assert dataset.layout == "nnunet" and dataset.class_names == ["background", "liver", "liver_tumor"]
    assert [(c.case_id, c.split) for c in dataset.cases] == [
        ("liver_001", "train"),
        ("liver_002", "train"),
        ("liver_100", "test"),
    ]
    labelmap, _ = load_case_label(dataset.cases[0], dataset.class_names)
    assert (labelmap[:2] == 2).all() and not labelmap[2:].any()
    assert discover(tmp_path / "Dataset003_Liver" / "dataset.json").layout == "nnunet"


def test_multichannel_nnunet_datasets_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="single-channel CT"):
        discover(_nnunet(tmp_path / "d", channels={"0": "T1", "1": "T2"}))


def test_unknown_empty_or_missing_datasets_raise_dataset_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        discover(tmp_path / "empty")
    (tmp_path / "other" / "x").mkdir(parents=True)
    (tmp_path / "other" / "x" / "image.png").write_bytes(b"png")
    with pytest.raises(DatasetError, match="cannot recognise the dataset layout"):
        discover(tmp_path / "other")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not a dataset"):
        discover(tmp_path / "notes.txt")
