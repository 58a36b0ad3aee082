"""Voxel grids: spacing, voxel volume, whether two grids are one, and which affines are usable.

An ``affine`` is the 4×4 matrix mapping voxel indices ``(i, j, k, 1)`` to world RAS millimetres
(nibabel's convention); its first three columns are the voxel axes, their lengths the spacing.

>>> voxel_spacing(affine)                               # array([0.7, 0.7, 2.5]) mm along i, j, k
>>> same_grid(label.shape, label_affine, ct.shape, ct_affine)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from voila.errors import InputImageError

# Two grids are one when every corner voxel lies within this fraction of a voxel of its partner:
# headers stored in float32 round positions far below it, a real shift or flip is far above it.
GRID_TOLERANCE_VOXELS = 0.01
# Direction cosines further from orthogonal than this are a sheared (e.g. gantry-tilted) grid.
ORTHOGONALITY_TOLERANCE = 1e-3


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along the array axes ``(i, j, k)``: the lengths of the affine's columns."""
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in millilitres."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def check_affine(affine: np.ndarray, what: str = "the image") -> None:
    """Raise :class:`InputImageError` unless ``affine`` is a finite 4×4 map with non-zero,
    mutually orthogonal voxel axes (the only grids the resampling back is exact for)."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputImageError(f"the geometry of {what} is invalid (its affine must be a finite 4x4 matrix)")
    spacing = voxel_spacing(affine)
    if np.any(spacing < 1e-6):
        axes = ", ".join("ijk"[axis] for axis in np.flatnonzero(spacing < 1e-6))
        raise InputImageError(
            f"{what} has a zero voxel size along axis {axes}; fix the voxel spacing in its header "
            "(e.g. re-export it, or set the spacing in Slicer's Volumes module)"
        )
    directions = affine[:3, :3] / spacing
    if abs(float(np.linalg.det(directions))) < 1e-6:
        raise InputImageError(
            f"{what} has a singular orientation (two voxel axes point the same way); fix its header"
        )
    if not np.allclose(directions.T @ directions, np.eye(3), atol=ORTHOGONALITY_TOLERANCE):
        raise InputImageError(
            f"the grid of {what} is sheared (non-orthogonal axes, e.g. a gantry-tilted CT); "
            "resample it first (Slicer: Resample Scalar/Vector/DWI Volume)"
        )


def grid_offset_mm(shape: Sequence[int], affine: np.ndarray, other_affine: np.ndarray) -> float:
    """Largest distance (mm) between the world positions of the grid's eight corner voxels
    under ``affine`` and under ``other_affine``."""
    corners = np.array(np.meshgrid(*[[0, max(int(n) - 1, 0)] for n in shape], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    moved = (
        np.asarray(affine, dtype=np.float64) @ corners - np.asarray(other_affine, dtype=np.float64) @ corners
    )
    return float(np.abs(moved[:3]).max())


def same_grid(
    shape: Sequence[int], affine: np.ndarray, other_shape: Sequence[int], other_affine: np.ndarray
) -> bool:
    """True when both grids have the same shape and their voxels lie at the same world positions
    (within :data:`GRID_TOLERANCE_VOXELS` of the finer grid's smallest voxel size)."""
    if tuple(int(n) for n in shape) != tuple(int(n) for n in other_shape):
        return False
    tolerance = GRID_TOLERANCE_VOXELS * float(
        min(voxel_spacing(affine).min(), voxel_spacing(other_affine).min())
    )
    return grid_offset_mm(shape, affine, other_affine) <= tolerance


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World RAS points ``(P, 3)`` (mm) → continuous voxel coordinates ``(P, 3)`` of the grid."""
    points = np.atleast_2d(np.asarray(points, dtype=np.float64))
    homogeneous = np.hstack([points, np.ones((len(points), 1))])
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ homogeneous.T).T[:, :3]


def voxel_of(affine: np.ndarray, shape: Sequence[int], point: Sequence[float]) -> tuple[int, int, int] | None:
    """The voxel whose centre is nearest the world point (R, A, S) in mm, or None outside the grid."""
    index = np.floor(world_to_voxel(affine, np.asarray(point))[0] + 0.5).astype(int)
    if np.any(index < 0) or np.any(index >= np.asarray(shape)):
        return None
    return int(index[0]), int(index[1]), int(index[2])


def box_region(
    affine: np.ndarray,
    shape: Sequence[int],
    corners: Sequence[Sequence[float]],
    margin: Sequence[int] = (0, 0, 0),
) -> tuple[slice, slice, slice] | None:
    """The slices of the grid covering an axis-aligned world box (two opposite corners, mm), widened
    by ``margin`` voxels per axis and clipped to the grid; None when the box misses the grid."""
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    eight = np.array(
        [[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])]
    )
    voxels = world_to_voxel(affine, eight)
    start = np.floor(voxels.min(axis=0) + 0.5).astype(int) - np.asarray(margin)
    stop = np.floor(voxels.max(axis=0) + 0.5).astype(int) + 1 + np.asarray(margin)
    start, stop = np.maximum(start, 0), np.minimum(stop, np.asarray(shape))
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def inside_box(
    affine: np.ndarray, region: tuple[slice, slice, slice], corners: Sequence[Sequence[float]]
) -> np.ndarray:
    """Boolean ``(d, h, w)`` over ``region``: whose voxel centres lie inside the world box (any grid
    orientation, oblique included)."""
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    axes = [np.arange(s.start, s.stop, dtype=np.float64) for s in region]
    affine = np.asarray(affine, dtype=np.float64)
    inside = np.ones(tuple(len(a) for a in axes), dtype=bool)
    for row in range(3):  # world coordinate `row` of every voxel, as a separable sum
        world = (
            affine[row, 0] * axes[0][:, None, None]
            + affine[row, 1] * axes[1][None, :, None]
            + affine[row, 2] * axes[2][None, None, :]
            + affine[row, 3]
        )
        inside &= (world >= low[row]) & (world <= high[row])
    return inside
