"""Synthetic abdominal CT phantoms with TotalSegmentator-named structures, for tests and demos.

A phantom is a body ellipsoid (air outside; subcutaneous fat, an abdominal muscle wall, and a
cavity of visceral fat) holding organs with the Hounsfield values of a portal-venous contrast CT
(the phase most abdominal CTs are taken in, and the one TotalSegmentator's data mostly show), in a
random pose and size, plus Gaussian noise. Anatomy follows
the RAS world: +x is the patient's Right, +y Anterior, +z Superior, so the liver and the right
kidney lie at larger x than the spleen and the left kidney.

>>> ct, labels, affine = make_phantom(seed=3)          # int16 HU, {name: bool mask}, voxel→RAS
>>> root = write_phantom_dataset(tmp_path / "phantoms", n_cases=4)   # TotalSegmentator layout
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
from scipy.spatial.transform import Rotation

from voila.data.io import atomic_path
from voila.data.layouts import write_totalsegmentator_case

PathLike = Union[str, "os.PathLike[str]"]

AIR_HU = -1000.0
FAT_HU = -100.0  # subcutaneous
MUSCLE_HU = 50.0  # abdominal wall
VISCERAL_FAT_HU = -80.0  # mesenteric / retroperitoneal fat around the organs
NOISE_HU = 12.0

# name: (HU, centre, radii) in body-normalised coordinates (the body ellipsoid has radii ~1),
# x towards the patient's right, y anterior, z superior. Where they overlap the later one wins.
# Portal-venous phase: enhanced liver, spleen, kidneys and aorta; bile and urine stay near water.
_ELLIPSOIDS = {
    "liver": (100.0, (0.38, 0.05, 0.30), (0.38, 0.45, 0.32)),
    "spleen": (110.0, (-0.50, -0.15, 0.35), (0.15, 0.22, 0.20)),
    "kidney_right": (150.0, (0.35, -0.35, -0.15), (0.13, 0.14, 0.24)),
    "kidney_left": (150.0, (-0.35, -0.35, -0.10), (0.13, 0.14, 0.24)),
    "urinary_bladder": (10.0, (0.0, 0.15, -0.80), (0.22, 0.20, 0.15)),
    # Sits in the liver's inferior-medial surface, so it always touches the liver.
    "gallbladder": (15.0, (0.22, 0.22, 0.05), (0.10, 0.10, 0.14)),
}
_AORTA = (170.0, (-0.08, -0.30), 0.09)  # HU, (x, y) of the tube's axis, radius
_VERTEBRAE = ("vertebrae_L3", "vertebrae_L2", "vertebrae_L1")  # inferior to superior
_BONE_HU = 700.0
_SPINE_AXIS = (0.0, -0.62)
_SPINE_RADIUS = 0.16
_BODY_RADII = (0.95, 0.80, 1.6)
# Inner ellipsoid scales: subcutaneous fat outside 0.88, abdominal muscle wall from 0.88 to 0.80,
# visceral fat inside 0.80.
_MUSCLE_SHELL = 0.88
_CAVITY = 0.80

STRUCTURES = (*_ELLIPSOIDS, "aorta", *_VERTEBRAE)


def make_phantom(
    shape: Sequence[int] = (64, 64, 64), spacing: Sequence[float] = (1.5, 1.5, 1.5), seed: int = 0
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """A random abdominal phantom: ``(ct int16 HU [i, j, k], {name: bool mask}, 4×4 voxel→RAS)``.

    The grid is RAS-aligned and centred on the world origin; the body gets a random rotation
    (up to 12° about the vertical axis, 5° about the others), shift and per-axis size (±10 %).
    Deterministic for a given ``seed``.
    """
    shape = tuple(int(n) for n in shape)
    spacing = np.asarray(spacing, dtype=np.float64)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing

    half_extent = np.asarray(shape) * spacing / 2
    scale = half_extent * rng.uniform(0.9, 1.1, size=3)
    rotation = Rotation.from_euler("xyz", rng.uniform(-1, 1, size=3) * np.radians([5, 5, 12])).as_matrix()
    shift = rng.uniform(-0.05, 0.05, size=3) * half_extent

    # Voxel centres in body-normalised coordinates: undo the pose, divide by the body size.
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij"), axis=-1)
    world = grid @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    body_coords = ((world - shift.astype(np.float32)) @ rotation.astype(np.float32)) / scale.astype(
        np.float32
    )
    x, y, z = (body_coords[..., axis] for axis in range(3))

    body = _ellipsoid(x, y, z, (0, 0, 0), _BODY_RADII)
    ct = np.full(shape, AIR_HU, dtype=np.float32)
    ct[body] = FAT_HU
    ct[_ellipsoid(x, y, z, (0, 0, 0), tuple(r * _MUSCLE_SHELL for r in _BODY_RADII))] = MUSCLE_HU
    ct[_ellipsoid(x, y, z, (0, 0, 0), tuple(r * _CAVITY for r in _BODY_RADII))] = VISCERAL_FAT_HU

    labels: dict[str, np.ndarray] = {}
    for name, (_, centre, radii) in _ELLIPSOIDS.items():
        labels[name] = _ellipsoid(x, y, z, centre, radii) & body
    aorta_hu, (ax, ay), radius = _AORTA
    labels["aorta"] = ((x - ax) ** 2 + (y - ay) ** 2 <= radius**2) & (np.abs(z) <= 0.9) & body
    spine = ((x - _SPINE_AXIS[0]) ** 2 + (y - _SPINE_AXIS[1]) ** 2 <= _SPINE_RADIUS**2) & body
    # Three vertebral bodies separated by softer intervertebral discs.
    edges = np.linspace(-0.75, 0.75, len(_VERTEBRAE) + 1)
    for name, low, high in zip(_VERTEBRAE, edges[:-1], edges[1:]):
        labels[name] = spine & (z >= low + 0.04) & (z <= high - 0.04)

    # Structures are disjoint: a later one (and the spine with its discs) claims shared voxels.
    claimed = spine.copy()
    for name in reversed(STRUCTURES):
        if name not in _VERTEBRAE:
            labels[name] &= ~claimed
        claimed |= labels[name]
    ct[spine] = 80.0
    hu_of = {name: hu for name, (hu, _, _) in _ELLIPSOIDS.items()}
    hu_of.update({"aorta": aorta_hu, **dict.fromkeys(_VERTEBRAE, _BONE_HU)})
    for name in STRUCTURES:
        ct[labels[name]] = hu_of[name]

    ct += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    return ct, {name: labels[name] for name in STRUCTURES}, affine


def write_phantom_dataset(
    root: PathLike,
    n_cases: int,
    shape: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (1.5, 1.5, 1.5),
    seed: int = 0,
    val_fraction: float = 0.25,
) -> Path:
    """Write ``n_cases`` phantoms in the TotalSegmentator v2 layout; returns ``root``.

    ``<root>/phantom_NNN/ct.nii.gz``, ``<root>/phantom_NNN/segmentations/<name>.nii.gz`` and
    ``<root>/meta.csv`` (``image_id;split``): the last ``round(n_cases * val_fraction)`` cases
    (at least one when ``val_fraction > 0`` and there are two or more cases) are ``val``.
    """
    root = Path(root)
    n_val = round(n_cases * val_fraction)
    if val_fraction > 0 and n_cases >= 2:
        n_val = min(max(n_val, 1), n_cases - 1)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for number in range(n_cases):
        case_id = f"phantom_{number:03d}"
        ct, labels, affine = make_phantom(shape, spacing, seed=seed * 100_003 + number)
        write_totalsegmentator_case(root, case_id, ct, affine, labels)
        rows.append((case_id, "val" if number >= n_cases - n_val else "train"))
    with atomic_path(root / "meta.csv") as partial, open(partial, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter=";")
        writer.writerow(("image_id", "split"))
        writer.writerows(rows)
    return root


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: Sequence[float], radii: Sequence[float]
) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + (
        (z - centre[2]) / radii[2]
    ) ** 2 <= 1.0
