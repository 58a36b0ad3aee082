"""Find the cases of a dataset in the layouts users already have on disk.

Three layouts are recognised by :func:`discover`:

* ``totalsegmentator`` — TotalSegmentator v2: ``<root>/<case>/ct.nii.gz`` and one binary mask per
  structure in ``<root>/<case>/segmentations/<name>.nii.gz``; optional ``<root>/meta.csv`` with
  ``image_id`` and ``split`` (train/val/test) columns, ``;`` or ``,`` separated.
* ``datalist`` — a MONAI / Medical Segmentation Decathlon JSON: ``training``/``validation``/``test``
  lists of ``{"image", "label"}``, ``labels`` ``{"0": "background", "1": "liver"}``; paths relative
  to ``dataroot`` or the JSON's folder. Training entries with a ``fold`` key put fold 0 in ``val``.
* ``nnunet`` — nnU-Net v2 raw: ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz``,
  ``imagesTs/``, ``dataset.json`` with ``labels`` ``{name: index}`` (a label named ``ignore``
  marks voxels that were not annotated, as in nnU-Net).

Partial labels at voxel level: a case annotated on some slices or in a region only carries its
annotated region (``<case>/annotated.nii.gz`` in the TotalSegmentator layout, ``"annotated"`` in a
datalist entry); outside it nothing is known, not even background.

Class names always start with ``"background"`` (index 0) so a label value indexes them directly.
:func:`write_totalsegmentator_case` writes a case in the TotalSegmentator layout (phantoms, and the
CTs and segments a user teaches from in 3D Slicer).

>>> dataset = discover("/data/Totalsegmentator_dataset_v201")
>>> labelmap, annotated = load_case_label(dataset.cases[0], dataset.class_names)
>>> write_totalsegmentator_case(root, "case_01", ct, affine, {"liver": liver_mask, "Tumor core": tumour})
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import nibabel as nib
import numpy as np

from voila.data.geometry import same_grid
from voila.data.io import NIFTI_SUFFIXES, file_suffix, read_image, write_volume
from voila.errors import DatasetError
from voila.vocabulary import BACKGROUND

PathLike = Union[str, "os.PathLike[str]"]

SPLITS = ("train", "val", "test")
# A case's annotated region (TotalSegmentator layout): <case>/annotated.nii.gz; in a datalist entry:
# "annotated": path. nnU-Net v2's own convention, a label named "ignore", is read likewise.
REGION_FILE = "annotated.nii.gz"
IGNORE_LABEL = "ignore"
_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}
# Characters that some file system refuses in a file name ("/" everywhere, the rest on Windows).
_NOT_IN_FILE_NAMES = re.compile(r'[<>:"/\\|?*\x00-\x1f]')


@dataclass
class Case:
    """One CT with its annotation: a label map (``label``) or per-structure masks (``masks``).

    ``region``: a mask of the voxels that were annotated at all (non-zero = annotated), for cases
    labelled on some slices or in a region only; without it the whole image is annotated.
    """

    case_id: str
    image: Path
    label: Path | None = None
    masks: dict[str, Path] = field(default_factory=dict)
    split: str = "train"
    region: Path | None = None


@dataclass
class Dataset:
    """A discovered dataset. ``class_names[0]`` is ``"background"``."""

    name: str
    root: Path
    layout: str
    cases: list[Case]
    class_names: list[str]

    def split(self, name: str) -> list[Case]:
        """The cases of one split (``train``, ``val`` or ``test``)."""
        return [case for case in self.cases if case.split == name]


def discover(path: PathLike) -> Dataset:
    """Detect the layout of ``path`` (a folder or a datalist JSON) and list its cases."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset {path} does not exist; check the path")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DatasetError(
                f"{path.name} is not a dataset: give a dataset folder or a datalist .json file"
            )
        content = _read_json(path)
        if "training" in content:
            return _datalist(path, content)
        if _is_nnunet_json(content):
            return _nnunet(path.parent, content)
        raise DatasetError(
            f"{path.name} has neither a 'training' list (MONAI datalist) nor nnU-Net labels; "
            "see the VOILA documentation for the supported layouts"
        )
    if not _children(path):
        raise DatasetError(f"dataset folder {path} is empty; give the folder that holds the cases")
    dataset_json = path / "dataset.json"
    if dataset_json.is_file():
        content = _read_json(dataset_json)
        if "training" in content:
            return _datalist(dataset_json, content)
        if _is_nnunet_json(content) and (path / "imagesTr").is_dir():
            return _nnunet(path, content)
    if any(child.is_dir() and (child / "ct.nii.gz").is_file() for child in _children(path)):
        return _totalsegmentator(path)
    raise DatasetError(
        f"cannot recognise the dataset layout of {path}: expected a TotalSegmentator folder "
        "(<case>/ct.nii.gz + segmentations/), an nnU-Net raw folder (imagesTr, labelsTr, dataset.json) "
        "or a MONAI datalist .json"
    )


def load_case_label(case: Case, class_names: list[str]) -> tuple[np.ndarray, list[str]]:
    """One label map on the case's image grid and the class names annotated in this case.

    Values index ``class_names`` (0 = background); uint8, or uint16 beyond 255 classes. A label-map
    case annotates every class; a per-structure-mask case annotates the structures whose mask file
    exists (even if empty) — absent files mean "unknown", not "absent" (partial labels).
    """
    dtype = np.uint8 if len(class_names) <= 256 else np.uint16
    shape, affine = _grid(case.image)
    if case.label is not None:
        labels, label_affine = read_image(case.label)
        _check_same_grid(case, case.label, labels.shape, label_affine, shape, affine)
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(
                f"label map {case.label} has values {int(labels.min())}..{int(labels.max())} "
                f"but the dataset names {len(class_names)} classes; fix its 'labels' list"
            )
        return labels.astype(dtype), [name for name in class_names if name != BACKGROUND]
    labelmap = np.zeros(shape, dtype=dtype)
    annotated = []
    for index, name in enumerate(class_names):
        mask_path = case.masks.get(name)
        if mask_path is None or index == 0:
            continue
        mask, mask_affine = read_image(mask_path)
        _check_same_grid(case, mask_path, mask.shape, mask_affine, shape, affine)
        labelmap[mask > 0] = index
        annotated.append(name)
    return labelmap, annotated


def file_stem(name: str) -> str:
    """A case or structure name as a file name stem: characters some file system refuses become
    spaces; the spaces, underscores and case a name has are kept, since a mask's stem is its label
    and decides its class (:func:`voila.vocabulary.class_name`).

    >>> file_stem("Kidney/left"), file_stem("Tumor core")
    ('Kidney left', 'Tumor core')
    """
    stem = " ".join(_NOT_IN_FILE_NAMES.sub(" ", str(name)).split()).rstrip(". ")
    if not stem:
        raise DatasetError(f"the name {name!r} has no character a file name can hold; rename it")
    return stem


def write_totalsegmentator_case(
    root: PathLike,
    case_id: str,
    image: np.ndarray,
    affine: np.ndarray,
    masks: dict[str, np.ndarray],
) -> Path:
    """Write one case in the TotalSegmentator layout and return its folder.

    ``<root>/<case_id>/ct.nii.gz`` holds ``image`` ``(X, Y, Z)`` with its voxel→RAS ``affine`` (any
    axis order the affine maps); ``segmentations/<label>.nii.gz`` holds each mask (same shape and
    grid, non-zero = inside). Labels are stored under :func:`file_stem`; labels whose files would
    collide on a case-insensitive file system are merged into one mask.
    """
    image = np.asarray(image)
    merged: dict[str, tuple[str, np.ndarray]] = {}
    for label, mask in masks.items():
        mask = np.asarray(mask) != 0
        if mask.shape != image.shape:
            raise DatasetError(f"the mask of {label!r} has shape {mask.shape}, the image {image.shape}")
        stem = file_stem(label)
        earlier = merged.get(stem.casefold())
        merged[stem.casefold()] = (stem, mask if earlier is None else earlier[1] | mask)
    folder = Path(root) / file_stem(case_id)
    (folder / "segmentations").mkdir(parents=True, exist_ok=True)
    write_volume(folder / "ct.nii.gz", image, affine)
    for stem, mask in merged.values():
        write_volume(folder / "segmentations" / f"{stem}.nii.gz", mask.astype(np.uint8), affine)
    return folder


def _totalsegmentator(root: Path) -> Dataset:
    splits = _read_meta_csv(root / "meta.csv")
    cases = []
    names: set[str] = set()
    for child in _children(root):
        image = child / "ct.nii.gz"
        if not (child.is_dir() and image.is_file()):
            continue
        segmentations = child / "segmentations"
        masks = {}
        if segmentations.is_dir():
            for mask in sorted(segmentations.iterdir()):
                if file_suffix(mask) in NIFTI_SUFFIXES:
                    masks[mask.name[: -len(file_suffix(mask))]] = mask
        names.update(masks)
        region = child / REGION_FILE
        cases.append(
            Case(
                child.name,
                image,
                None,
                masks,
                splits.get(child.name, "train"),
                region if region.is_file() else None,
            )
        )
    if not names:
        raise DatasetError(
            f"no masks found in {root}/<case>/segmentations/; each case needs <structure>.nii.gz masks"
        )
    return Dataset(root.name, root, "totalsegmentator", cases, [BACKGROUND, *sorted(names)])


def _read_meta_csv(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8-sig")
    delimiter = ";" if text.splitlines()[0].count(";") > text.splitlines()[0].count(",") else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    if not rows or "image_id" not in rows[0] or "split" not in rows[0]:
        raise DatasetError(f"{path} needs 'image_id' and 'split' columns; fix or remove it")
    return {row["image_id"].strip(): _split_name(row["split"], path) for row in rows}


def _datalist(path: Path, content: dict[str, Any]) -> Dataset:
    folder = path.parent
    dataroot = Path(content["dataroot"]) if content.get("dataroot") else None
    root = folder if dataroot is None else dataroot if dataroot.is_absolute() else folder / dataroot
    class_names = _names_from_index_map(content.get("labels"), path)
    cases: list[Case] = []
    for section in ("training", "validation", "test", "testing"):
        for number, entry in enumerate(content.get(section) or []):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or "image" not in entry:
                raise DatasetError(f"{path.name}: entry {number} of '{section}' has no 'image'")
            image = _resolve(root, entry["image"], path)
            label = _resolve(root, entry["label"], path) if entry.get("label") else None
            region = _resolve(root, entry["annotated"], path) if entry.get("annotated") else None
            split = _split_name(section, path)
            if section == "training" and "validation" not in content and "fold" in entry:
                split = "val" if int(entry["fold"]) == 0 else "train"
            cases.append(Case(_case_id(image), image, label, {}, split, region))
    if not any(case.label is not None for case in cases):
        raise DatasetError(f"{path.name} lists no labelled case; add 'training' entries with 'label'")
    name = str(content.get("name") or path.stem)
    return Dataset(name, root, "datalist", cases, class_names)


def _nnunet(root: Path, content: dict[str, Any]) -> Dataset:
    channels = content.get("channel_names") or content.get("modality") or {"0": "CT"}
    if len(channels) != 1:
        raise DatasetError(
            f"{root.name} has {len(channels)} input channels; VOILA segments single-channel CT"
        )
    labels = content["labels"]
    if any(not isinstance(value, int) for value in labels.values()):
        raise DatasetError(f"{root.name}/dataset.json uses region labels; VOILA needs one index per name")
    class_names = _names_from_index_map({str(index): name for name, index in labels.items()}, root)
    ending = content.get("file_ending", ".nii.gz")
    cases = []
    for folder, split in (("imagesTr", "train"), ("imagesTs", "test")):
        for image in sorted((root / folder).glob(f"*_0000{ending}")):
            case_id = image.name[: -len(f"_0000{ending}")]
            label = root / "labelsTr" / f"{case_id}{ending}" if split == "train" else None
            if label is not None and not label.is_file():
                raise DatasetError(f"{root.name}: {image.name} has no label {label.name} in labelsTr")
            cases.append(Case(case_id, image, label, {}, split))
    if not any(case.split == "train" for case in cases):
        raise DatasetError(f"{root}/imagesTr has no <case>_0000{ending} images")
    return Dataset(root.name, root, "nnunet", cases, class_names)


def _names_from_index_map(labels: Any, where: Path) -> list[str]:
    if not isinstance(labels, dict) or not labels:
        raise DatasetError(
            f"{where.name} has no 'labels' mapping; VOILA needs class names, "
            'add e.g. "labels": {"0": "background", "1": "liver"}'
        )
    try:
        by_index = {int(index): str(name) for index, name in labels.items()}
    except ValueError as error:
        raise DatasetError(f"{where.name}: 'labels' keys must be integers ({error})") from error
    missing = [index for index in range(1, max(by_index) + 1) if index not in by_index]
    if missing or min(by_index) < 0:
        raise DatasetError(
            f"{where.name}: 'labels' must number classes 1..N without gaps (missing {missing})"
        )
    return [BACKGROUND] + [by_index[index] for index in range(1, max(by_index) + 1)]


def _is_nnunet_json(content: dict[str, Any]) -> bool:
    labels = content.get("labels")
    return isinstance(labels, dict) and BACKGROUND in labels and not str(next(iter(labels))).isdigit()


def _resolve(root: Path, relative: str, where: Path) -> Path:
    path = Path(relative)
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise DatasetError(f"{where.name} lists {relative}, which does not exist under {root}")
    return path


def _case_id(image: Path) -> str:
    suffix = file_suffix(image)
    stem = image.name[: -len(suffix)] if suffix else image.name
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def _split_name(value: str, where: Path) -> str:
    split = _SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
    if split not in SPLITS:
        raise DatasetError(f"{where.name}: unknown split '{value}'; use train, val or test")
    return split


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path}: {error}; fix the JSON") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path} must contain a JSON object")
    return content


def _children(path: Path) -> list[Path]:
    return sorted(child for child in path.iterdir() if not child.name.startswith("."))


def _grid(image: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image without reading its voxels where the format allows."""
    if file_suffix(image) in NIFTI_SUFFIXES:
        header = nib.load(str(image))
        return tuple(int(n) for n in header.shape[:3]), np.asarray(header.affine, dtype=np.float64)
    array, affine = read_image(image)
    return array.shape, affine


def _check_same_grid(
    case: Case,
    path: Path,
    shape: tuple[int, ...],
    affine: np.ndarray,
    image_shape: tuple[int, ...],
    image_affine: np.ndarray,
) -> None:
    if not same_grid(shape, affine, image_shape, image_affine):
        difference = (
            f"shape {tuple(shape)} vs {tuple(image_shape)}"
            if tuple(shape) != tuple(image_shape)
            else "same shape, but the voxels lie at other positions: shifted, flipped or another spacing"
        )
        raise DatasetError(
            f"case {case.case_id}: {path.name} is not on the grid of {case.image.name} ({difference}); "
            "resample it onto the image"
        )
