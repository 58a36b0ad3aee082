"""Overlap and surface metrics of one binary structure: Dice, normalised surface Dice, HD95.

Conventions (those of DeepMind's ``surface-distance`` package, Nikolov et al. 2021, which
TotalSegmentator's NSD follows):

- The surface of a mask is the marching-cubes surface on the boundary *between* voxels, sampled at
  the voxel corners: every 2×2×2 neighbourhood whose eight voxels are neither all inside nor all
  outside is a surface element ("surfel") whose area in mm² follows from its neighbourhood code and
  the voxel spacing (the code → area table is MONAI's port of DeepMind's, built for ``spacing``).
- Surface distances are Euclidean, in mm (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``), from each surfel of one surface to the nearest surfel of the other.
- HD95 is the larger of the two directed 95th percentiles, each weighted by surfel area.
- NSD at tolerance τ is (area of both surfaces within τ of the other) / (total area of both).
- Dice counts voxels: 2|P∩R| / (|P| + |R|).

Undefined values: both masks empty → Dice, NSD and HD95 are NaN; exactly one empty → Dice 0,
NSD 0, HD95 ``inf`` (there is no surface to measure to). The TotalSegmentator protocol in
:mod:`voila.evaluate` decides what enters the means.

Masks are boolean arrays indexed ``[i, j, k]``; ``spacing`` is the voxel size in mm along those
three axes. Everything is computed on the bounding box of the two masks, so cost scales with the
structure, not the volume.

>>> m = compute_metrics(pred, ref, spacing=(0.8, 0.8, 1.5), tolerance_mm=3.0)
>>> m.dice, m.nsd, m.hd95_mm
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

Spacing = Sequence[float]

# Bit weights of the eight voxels of a 2x2x2 neighbourhood, in the order the area table expects.
_NEIGHBOUR_CODE_KERNEL = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed surface distances between a prediction and a reference, sorted ascending.

    ``ref_to_pred[n]`` is the distance in mm from reference surfel ``n`` (area ``ref_areas[n]``
    mm²) to the nearest predicted surfel; ``pred_to_ref`` likewise the other way. An empty mask has
    no surfels; its arrays are empty.
    """

    ref_to_pred: np.ndarray
    ref_areas: np.ndarray
    pred_to_ref: np.ndarray
    pred_areas: np.ndarray

    def normalized_surface_dice(self, tolerance_mm: float) -> float:
        """Fraction of the surface area of both masks that lies within ``tolerance_mm`` of the other."""
        total = self.ref_areas.sum() + self.pred_areas.sum()
        if total == 0:
            return float("nan")
        within = self.ref_areas[self.ref_to_pred <= tolerance_mm].sum()
        within += self.pred_areas[self.pred_to_ref <= tolerance_mm].sum()
        return float(within / total)

    def hausdorff(self, percent: float = 95.0) -> float:
        """The larger directed area-weighted ``percent``-th percentile distance, in mm."""
        if len(self.ref_to_pred) == 0 and len(self.pred_to_ref) == 0:
            return float("nan")
        if len(self.ref_to_pred) == 0 or len(self.pred_to_ref) == 0:
            return float("inf")
        return max(
            _weighted_percentile(self.ref_to_pred, self.ref_areas, percent),
            _weighted_percentile(self.pred_to_ref, self.pred_areas, percent),
        )


@dataclass(frozen=True)
class StructureMetrics:
    """All metrics of one structure in one case (see the module docstring for conventions)."""

    dice: float
    nsd: float
    hd95_mm: float
    ref_voxels: int
    pred_voxels: int


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel Dice ``2|P∩R| / (|P| + |R|)``; NaN when both masks are empty."""
    pred, ref = _check_masks(pred, ref)
    total = int(pred.sum()) + int(ref.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> SurfaceDistances:
    """Surfel-area-weighted distances between the surfaces of two masks (DeepMind conventions)."""
    pred, ref = _check_masks(pred, ref)
    spacing = _check_spacing(spacing)
    region = _bounding_box(pred | ref)
    if region is None:
        empty = np.zeros(0)
        return SurfaceDistances(empty, empty, empty, empty)
    # One voxel of background on every side, so surfels on the crop's faces are complete.
    pred_crop = np.pad(pred[region], 1).astype(np.uint8)
    ref_crop = np.pad(ref[region], 1).astype(np.uint8)
    area_table = _surfel_area_table(spacing)
    pred_codes = ndimage.correlate(pred_crop, _NEIGHBOUR_CODE_KERNEL, mode="constant", cval=0)
    ref_codes = ndimage.correlate(ref_crop, _NEIGHBOUR_CODE_KERNEL, mode="constant", cval=0)
    pred_surface = (pred_codes != 0) & (pred_codes != 255)
    ref_surface = (ref_codes != 0) & (ref_codes != 255)
    ref_to_pred, ref_areas = _directed(ref_surface, ref_codes, pred_surface, area_table, spacing)
    pred_to_ref, pred_areas = _directed(pred_surface, pred_codes, ref_surface, area_table, spacing)
    return SurfaceDistances(ref_to_pred, ref_areas, pred_to_ref, pred_areas)


def normalized_surface_dice(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, tolerance_mm: float = 3.0
) -> float:
    """Normalised surface Dice at ``tolerance_mm``: 1 = every surfel within tolerance of the other."""
    return surface_distances(pred, ref, spacing).normalized_surface_dice(tolerance_mm)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing) -> float:
    """95th-percentile Hausdorff distance in mm (``inf`` when exactly one mask is empty)."""
    return surface_distances(pred, ref, spacing).hausdorff(95.0)


def compute_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, tolerance_mm: float = 3.0
) -> StructureMetrics:
    """Dice, NSD and HD95 of one structure, with the surface distances computed once."""
    distances = surface_distances(pred, ref, spacing)
    return StructureMetrics(
        dice=dice(pred, ref),
        nsd=distances.normalized_surface_dice(tolerance_mm),
        hd95_mm=distances.hausdorff(95.0),
        ref_voxels=int(np.count_nonzero(ref)),
        pred_voxels=int(np.count_nonzero(pred)),
    )


def _directed(
    from_surface: np.ndarray,
    from_codes: np.ndarray,
    to_surface: np.ndarray,
    area_table: np.ndarray,
    spacing: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray]:
    areas = area_table[from_codes[from_surface]]
    if not to_surface.any():
        return np.full(len(areas), np.inf), areas
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    distances = distance_map[from_surface]
    order = np.argsort(distances, kind="stable")
    return distances[order], areas[order]


def _weighted_percentile(sorted_distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(sorted_distances[min(index, len(sorted_distances) - 1)])


@functools.lru_cache(maxsize=16)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    from monai.metrics.utils import get_code_to_measure_table

    table, _ = get_code_to_measure_table(spacing)
    return table.cpu().numpy().astype(np.float64)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    objects = ndimage.find_objects(mask.astype(np.uint8))
    return objects[0] if objects else None


def _check_masks(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"masks must be 3-D and of one shape, got {pred.shape} and {ref.shape}")
    return pred, ref


def _check_spacing(spacing: Spacing) -> tuple[float, float, float]:
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive numbers in mm, got {spacing!r}")
    return values  # type: ignore[return-value]
