"""Find the cases of a prediction or reference path and read their per-structure masks.

A path is one of:

- a labelmap file (one case, named after the file);
- a folder of labelmap files, one case per file (``<case>.nii.gz``, ``.nrrd``, ``.mha``...);
- a TotalSegmentator dataset root, ``<root>/<case>/segmentations/<structure>.nii.gz``;
- one TotalSegmentator case, ``<case>/`` holding ``segmentations/``, or that ``segmentations/``
  folder itself, or any folder whose file names are all structure names (TotalSegmentator's own
  output folder): one case of per-structure binary masks.

A labelmap's values are named by, in order of preference: its sidecar JSON (``<labelmap>.json``
or ``<labelmap stem>.json``, written by ``voila segment``: ``{"labels": [{"label": 1,
"structure": "liver", "prompt": "liver"}, ...]}``), explicit ``label=name`` pairs, or the
TotalSegmentator class indices of the VOILA vocabulary. Names are compared after
:meth:`Vocabulary.match` (so "left kidney" and "kidney_left" are one class), else after
:func:`normalize_prompt`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from voila.data.geometry import grid_offset_mm, same_grid
from voila.data.io import ITK_SUFFIXES, NIFTI_SUFFIXES, file_suffix, read_image
from voila.errors import InputImageError, VoilaError
from voila.vocabulary import Vocabulary, class_key, normalize_prompt

IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
Region = tuple  # tuple[slice, slice, slice]


@dataclass(frozen=True)
class CaseFiles:
    """One case: a ``labelmap`` file, or ``masks`` (class name → binary mask file)."""

    name: str
    labelmap: Path | None = None
    masks: Mapping[str, Path] = field(default_factory=dict)

    @property
    def location(self) -> Path:
        if self.labelmap is not None:
            return self.labelmap
        return next(iter(self.masks.values())).parent


class Naming:
    """Turns structure names, prompts and label values into one canonical class name."""

    def __init__(self, label_names: Mapping[int, str] | None = None):
        self._vocabulary: Vocabulary | None = None
        self._vocabulary_error = ""
        try:
            self._vocabulary = Vocabulary.load()
        except VoilaError as error:
            self._vocabulary_error = str(error)
        self.label_names = {int(k): self.canonical(v) for k, v in (label_names or {}).items()}
        if any(value <= 0 for value in self.label_names):
            raise InputImageError("label values named with --classes must be >= 1 (0 is background)")

    def canonical(self, text: str) -> str:
        """The vocabulary name a text means, or the normalised text for free-text classes
        (:func:`voila.vocabulary.class_key`)."""
        if self._vocabulary is not None:
            return class_key(text, self._vocabulary)
        return normalize_prompt(text)

    def is_structure_name(self, text: str) -> bool:
        """True for a vocabulary structure or one of the explicitly named labels."""
        name = self.canonical(text)
        known = self._vocabulary is not None and name in self._vocabulary
        return known or name in self.label_names.values()

    def labelmap_names(self, path: Path) -> dict[int, str]:
        """Label value → class name of a labelmap file (sidecar, explicit names, TotalSegmentator)."""
        sidecar = _sidecar(path)
        if sidecar is not None:
            return self._read_sidecar(sidecar)
        if self.label_names:
            return dict(self.label_names)
        if self._vocabulary is None:
            raise InputImageError(
                f"cannot name the labels of {path.name}: no sidecar {path.name}.json and the VOILA "
                f"vocabulary is unavailable ({self._vocabulary_error}); pass --classes 1=liver 2=spleen ..."
            )
        return {structure.label: structure.name for structure in self._vocabulary}

    def _read_sidecar(self, sidecar: Path) -> dict[int, str]:
        try:
            entries = json.loads(sidecar.read_text(encoding="utf-8"))["labels"]
            names = {}
            for entry in entries:
                text = entry.get("structure") or entry.get("prompt")
                if not text:
                    raise KeyError("structure")
                if int(entry["label"]) > 0:  # 0 is background
                    names[int(entry["label"])] = self.canonical(str(text))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise InputImageError(
                f"cannot read the label names in {sidecar} ({type(error).__name__}: {error}); "
                'it must hold {"labels": [{"label": 1, "structure": ..., "prompt": ...}]}; '
                "fix or delete it and pass --classes"
            ) from None
        return names


def discover_cases(path: str | os.PathLike, naming: Naming) -> list[CaseFiles]:
    """The cases under ``path`` (see the module docstring for the accepted layouts), by name."""
    path = Path(path)
    if not path.exists():
        raise InputImageError(f"{path} does not exist; check the path")
    if path.is_file():
        return [CaseFiles(_case_name(path), labelmap=path)]
    if (path / "segmentations").is_dir():
        return [_mask_case(path.name, path / "segmentations", naming)]
    case_folders = sorted(d for d in path.iterdir() if (d / "segmentations").is_dir())
    if case_folders:
        return [_mask_case(d.name, d / "segmentations", naming) for d in case_folders]
    images = _image_files(path)
    if not images:
        raise InputImageError(
            f"{path} holds no labelmap files, mask files or TotalSegmentator cases "
            "(<case>/segmentations/<structure>.nii.gz); check the path"
        )
    if path.name == "segmentations":
        return [_mask_case(path.parent.name, path, naming)]
    if all(naming.is_structure_name(_case_name(f)) for f in images):
        return [_mask_case(path.name, path, naming)]
    cases = [CaseFiles(_case_name(f), labelmap=f) for f in images]
    names = [case.name for case in cases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputImageError(
            f"{path} holds several files for case(s) {', '.join(duplicates)}; keep one file per case"
        )
    return cases


class LoadedCase:
    """A case's masks on its grid. ``region(name)`` is the bounding box of a class (``None`` if empty)."""

    def __init__(self, files: CaseFiles, naming: Naming):
        self.files = files
        self._cached: tuple[str, np.ndarray | None] | None = None
        self.unnamed_values: list[int] = []
        if files.labelmap is not None:
            labels, self.affine = _read_labelmap(files.labelmap)
            self.shape = labels.shape
            names = naming.labelmap_names(files.labelmap)
            present = np.union1d([0], np.unique(labels)).astype(labels.dtype)
            self.unnamed_values = [int(v) for v in present if v > 0 and int(v) not in names]
            # one compact index per value present (a label value of 2**31 - 1 must not size any table)
            self.labels = np.searchsorted(present, labels).astype(np.min_scalar_type(len(present)))
            self._values: dict[str, list[int]] = {}
            for value, name in names.items():
                where = int(np.searchsorted(present, value))
                if where < len(present) and present[where] == value and value > 0:
                    self._values.setdefault(name, []).append(where)
            self._objects = ndimage.find_objects(self.labels)
        else:
            first = next(iter(files.masks.values()))
            array, self.affine = read_image(first)
            self.shape = array.shape
        self.class_names = set(defined_names(files, naming))

    def region(self, name: str) -> Region | None:
        if self.files.labelmap is not None:
            boxes = [self._objects[v - 1] for v in self._values.get(name, ()) if v <= len(self._objects)]
            return _union([box for box in boxes if box is not None])
        mask = self._mask_file(name)
        return None if mask is None else _union(ndimage.find_objects(mask.view(np.uint8)))

    def mask(self, name: str, region: Region) -> np.ndarray:
        """Boolean mask of class ``name`` inside ``region`` (all ``False`` if the class is absent)."""
        if self.files.labelmap is not None:
            values = self._values.get(name, [])
            return np.isin(self.labels[region], values)
        mask = self._mask_file(name)
        if mask is None:
            return np.zeros(tuple(s.stop - s.start for s in region), dtype=bool)
        return mask[region]

    def _mask_file(self, name: str) -> np.ndarray | None:
        if self._cached is not None and self._cached[0] == name:
            return self._cached[1]
        path = self.files.masks.get(name)
        mask = None
        if path is not None:
            array, affine = read_image(path)
            check_same_grid(path, array.shape, affine, self.files.location, self.shape, self.affine)
            mask = array != 0
        self._cached = (name, mask)
        return mask


def defined_names(files: CaseFiles, naming: Naming) -> list[str]:
    """The class names a case defines (present or not), without reading any voxel."""
    if files.labelmap is not None:
        return list(dict.fromkeys(naming.labelmap_names(files.labelmap).values()))
    return list(files.masks)


def check_same_grid(
    path: Path,
    shape: tuple,
    affine: np.ndarray,
    other_path: Path,
    other_shape: tuple,
    other_affine: np.ndarray,
) -> None:
    """Raise :class:`InputImageError` unless both volumes share shape and voxel positions
    (:func:`voila.data.geometry.same_grid`)."""
    if tuple(shape) != tuple(other_shape):
        raise InputImageError(
            f"{path} has shape {tuple(shape)} but {other_path} has {tuple(other_shape)}: they are not on "
            "the same grid; resample the prediction onto the reference grid (nearest neighbour) first"
        )
    if not same_grid(shape, affine, other_shape, other_affine):
        offset = grid_offset_mm(shape, affine, other_affine)
        raise InputImageError(
            f"{path} and {other_path} have the same shape but different geometry (voxel positions differ "
            f"by up to {offset:.3g} mm): resample the prediction onto the reference grid "
            "(nearest neighbour) first"
        )


def _read_labelmap(path: Path) -> tuple[np.ndarray, np.ndarray]:
    array, affine = read_image(path)
    if np.issubdtype(array.dtype, np.floating):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise InputImageError(
                f"{path.name} has non-integer voxel values; a labelmap must hold integer labels "
                "(0 = background)"
            )
        array = rounded
    if array.size and array.min() < 0:
        raise InputImageError(f"{path.name} has negative labels; a labelmap must hold labels >= 0")
    return array.astype(np.min_scalar_type(int(array.max()) if array.size else 0)), affine


def _mask_case(name: str, folder: Path, naming: Naming) -> CaseFiles:
    masks: dict[str, Path] = {}
    for file in _image_files(folder):
        class_name = naming.canonical(_case_name(file))
        if class_name in masks:
            raise InputImageError(
                f"{folder} holds two masks for class '{class_name}' ({masks[class_name].name}, {file.name}); "
                "keep one"
            )
        masks[class_name] = file
    if not masks:
        raise InputImageError(f"{folder} holds no mask files (<structure>.nii.gz); check the path")
    return CaseFiles(name, masks=masks)


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        f
        for f in folder.iterdir()
        if f.is_file() and not f.name.startswith(".") and file_suffix(f) in IMAGE_SUFFIXES
    )


def _case_name(path: Path) -> str:
    name = path.name
    suffix = file_suffix(path)
    name = name[: len(name) - len(suffix)] if suffix else name
    return name[: -len(".seg")] if name.endswith(".seg") else name


def _sidecar(path: Path) -> Path | None:
    for candidate in (path.with_name(path.name + ".json"), path.with_name(_case_name(path) + ".json")):
        if candidate.is_file():
            return candidate
    return None


def _union(boxes: list) -> Region | None:
    boxes = [box for box in boxes if box is not None]
    if not boxes:
        return None
    return tuple(
        slice(min(box[axis].start for box in boxes), max(box[axis].stop for box in boxes))
        for axis in range(3)
    )
