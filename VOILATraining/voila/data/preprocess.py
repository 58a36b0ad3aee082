"""The one deterministic preprocessing, shared by training and inference, and the way back.

Forward (:func:`deterministic_transforms`, :func:`preprocess_volume`): reorient to RAS, crop to the
body, resample to the model spacing, clip and z-normalise the HU values with fixed CT statistics.
Backward (:func:`resample_to_grid`): put values computed on the model grid onto any other grid,
exactly through the two voxel→RAS affines, in bounded memory.

>>> volume = preprocess_volume(ct, affine, PreprocessingConfig())
>>> volume.image.shape                       # torch.float32 (1, D, H, W) on the model grid
>>> labels = resample_to_grid(model_labels, volume.affine, ct.shape, affine, order=0)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from voila.errors import ConfigError, InputImageError

if TYPE_CHECKING:  # MONAI is imported where it is used: reading a model card must stay light
    from monai.data import MetaTensor
    from monai.transforms import Compose

# Axis codes name the direction an axis points to: in RAS (nibabel's world) +x is the patient's
# Right, +y Anterior, +z Superior; (start, end) letters of world x, y, z.
RAS_AXIS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Voxels of body context kept around the foreground box when cropping.
CROP_MARGIN = 4
# Target voxels per slab in resample_to_grid: 3 float64 coordinates each, ~50 MB per slab.
_SLAB_VOXELS = 1 << 21


# Voxel types handed to MONAI as they are (others are converted to float32 first).
_NATIVE_DTYPES = (np.dtype(np.int16), np.dtype(np.int8), np.dtype(np.uint8), np.dtype(np.float32))


@dataclass(frozen=True)
class PreprocessingConfig:
    """CT preprocessing: RAS orientation, 1.5 mm spacing, nnU-Net-style clip + z-score, body crop."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    orientation: str = "RAS"
    intensity_min: float = -1003.0
    intensity_max: float = 1546.0
    mean: float = -104.44
    std: float = 505.35
    foreground_threshold: float = -500.0

    def normalise(self, hu: float) -> float:
        """The model-space value of a Hounsfield value ``hu`` (after clipping)."""
        clipped = min(max(hu, self.intensity_min), self.intensity_max)
        return (clipped - self.mean) / self.std

    def to_dict(self) -> dict:
        values = asdict(self)
        values["spacing"] = list(self.spacing)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessingConfig:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown preprocessing keys {unknown}; allowed: {', '.join(sorted(known))}")
        values = dict(values)
        if "spacing" in values:
            spacing = values["spacing"]
            if isinstance(spacing, (int, float)):
                spacing = (spacing,) * 3
            values["spacing"] = tuple(float(s) for s in spacing)
            if len(values["spacing"]) != 3 or min(values["spacing"]) <= 0:
                raise ConfigError(f"preprocessing spacing must be 3 positive numbers, got {spacing}")
        config = cls(**values)
        if config.std <= 0 or config.intensity_max <= config.intensity_min:
            raise ConfigError("preprocessing needs std > 0 and intensity_max > intensity_min")
        return config


@dataclass
class ModelGridVolume:
    """A CT on the model grid: ``image`` float32 ``(1, D, H, W)``; ``affine`` model voxel→world RAS."""

    image: torch.Tensor
    affine: np.ndarray


class AboveThreshold:
    """Foreground selector for ``CropForegroundd`` (picklable, unlike a lambda, for worker processes).

    Selects ``x > threshold``; when nothing is above it (an empty or non-CT volume) selects
    everything, so the crop never yields an empty volume.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def __call__(self, image: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        selected = image > self.threshold
        return selected if selected.any() else image == image


def to_metatensor(array: np.ndarray | torch.Tensor, affine: np.ndarray) -> MetaTensor:
    """A channel-less ``(i, j, k)`` MetaTensor with its voxel→RAS ``affine``, as ``LoadImaged`` makes."""
    from monai.data import MetaTensor

    return _declare_channel_less_3d(
        MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))
    )


def _declare_channel_less_3d(image: torch.Tensor) -> torch.Tensor:
    """Mark a 3-D MetaTensor as channel-less so MONAI treats all three axes as spatial.

    Without the mark MONAI (>= 1.5) takes the first axis of a 3-D tensor for the channel, and
    cropping then leaves the third axis out of the affine update: a silently shifted grid.
    """
    from monai.data import MetaTensor

    if isinstance(image, MetaTensor) and image.ndim == 3:
        image.meta["original_channel_dim"] = "no_channel"
        image.affine = image.affine  # re-derives the cached spatial rank from the affine
    return image


def deterministic_transforms(
    config: PreprocessingConfig,
    image_key: str = "image",
    label_keys: Sequence[str] = (),
    crop_foreground: bool = True,
) -> Compose:
    """MONAI dictionary transforms from a 3-D CT (+ label maps) to the model grid.

    Inputs are channel-less ``(i, j, k)`` arrays (MetaTensors carrying their RAS affine, as
    ``LoadImaged`` makes them). Outputs are ``(1, D, H, W)`` MetaTensors: the image float32 and
    normalised; labels resampled with nearest neighbour. Used unchanged for training and inference.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        Lambdad,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    label_keys = list(label_keys)
    keys = [image_key, *label_keys]
    transforms = [
        Lambdad(keys, _declare_channel_less_3d),
        EnsureChannelFirstd(keys, channel_dim="no_channel"),
        Orientationd(keys, axcodes=config.orientation, labels=RAS_AXIS_LABELS),
    ]
    if crop_foreground:
        # Cropping before resampling spares the resampler the air around the patient.
        transforms.append(
            CropForegroundd(
                keys,
                source_key=image_key,
                select_fn=AboveThreshold(config.foreground_threshold),
                margin=CROP_MARGIN,
                allow_smaller=True,
            )
        )
    transforms += [
        Spacingd(
            keys,
            pixdim=config.spacing,
            mode=["bilinear"] + ["nearest"] * len(label_keys),
            padding_mode="border",
            dtype=np.float32,
        ),
        # A linear map from [min, max] to normalised units is exactly (clip(x) - mean) / std.
        ScaleIntensityRanged(
            image_key,
            a_min=config.intensity_min,
            a_max=config.intensity_max,
            b_min=config.normalise(config.intensity_min),
            b_max=config.normalise(config.intensity_max),
            clip=True,
            dtype=np.float32,
        ),
    ]
    return Compose(transforms)


def preprocess_volume(image: np.ndarray, affine: np.ndarray, config: PreprocessingConfig) -> ModelGridVolume:
    """Apply :func:`deterministic_transforms` to one CT ``image`` ``[i, j, k]`` with its RAS ``affine``."""
    image = np.asarray(image)
    affine = np.asarray(affine, dtype=np.float64)
    if image.ndim != 3:
        raise InputImageError(f"expected a 3-D CT volume, got an array of shape {image.shape}")
    if affine.shape != (4, 4):
        raise InputImageError(f"expected a 4x4 voxel-to-RAS affine, got shape {affine.shape}")
    if image.dtype not in _NATIVE_DTYPES:  # e.g. float64 or uint16: torch resamples float32
        image = image.astype(np.float32)
    from monai.data import MetaTensor

    # int16 stays int16 until Spacingd: reorientation and the body crop touch half the bytes, and
    # only the cropped region is ever converted to float32 (a 512×512×400 CT: 0.4 GB less at peak)
    tensor = MetaTensor(torch.from_numpy(np.ascontiguousarray(image)), affine=torch.from_numpy(affine))
    output = deterministic_transforms(config)({"image": tensor})["image"]
    return ModelGridVolume(
        image=output.as_tensor().to(torch.float32).contiguous(),
        affine=np.asarray(output.affine, dtype=np.float64),
    )


def resample_to_grid(
    values: np.ndarray,
    source_affine: np.ndarray,
    target_shape: Sequence[int],
    target_affine: np.ndarray,
    order: int,
) -> np.ndarray:
    """Sample ``values`` (3-D, on the grid of ``source_affine``) at every voxel of a target grid.

    Each target voxel goes target voxel → world RAS → source voxel coordinates. ``order`` 0 is
    nearest neighbour (label maps; dtype kept), 1 is trilinear (heatmaps; float32). Target voxels
    more than half a source voxel outside the source grid get 0; inside that half-voxel rim the edge
    value is used. Works in slabs along the first target axis, so memory beyond the output is
    bounded (~100 MB) whatever the target size.

    When every target axis runs along one source axis (the usual case: the model grid is the
    input's RAS reorientation at another spacing, so the map is a scaled permutation) the
    sampling is separable and done per axis, several times faster than the general
    ``map_coordinates`` path and equal to it (labels exactly, values to float32 rounding).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"expected 3-D values, got shape {values.shape}")
    target_shape = tuple(int(n) for n in target_shape)
    target_to_source = np.linalg.inv(np.asarray(source_affine, dtype=np.float64)) @ np.asarray(
        target_affine, dtype=np.float64
    )
    source = values if order == 0 else values.astype(np.float32, copy=False)
    rows, cols = np.asarray(target_to_source[:3, :3]), target_to_source[:3, 3]
    feeding = _source_axis_of_each_target_axis(rows)
    if feeding is not None:
        return _resample_axis_aligned(source, rows, cols, feeding, target_shape, order)
    return _resample_general(source, rows, cols, target_shape, order)


def _resample_general(
    source: np.ndarray, rows: np.ndarray, cols: np.ndarray, target_shape: tuple[int, int, int], order: int
) -> np.ndarray:
    """:func:`resample_to_grid` for any affine map: ``map_coordinates`` slab by slab."""
    output = np.zeros(target_shape, dtype=source.dtype)

    _, n_j, n_k = target_shape
    j = np.arange(n_j, dtype=np.float64)[:, None]
    k = np.arange(n_k, dtype=np.float64)[None, :]
    in_plane = [rows[axis, 1] * j + rows[axis, 2] * k + cols[axis] for axis in range(3)]
    step = max(1, _SLAB_VOXELS // max(1, n_j * n_k))
    coords = np.empty((3, min(step, target_shape[0]), n_j, n_k), dtype=np.float64)
    for start in range(0, target_shape[0], step):
        i = np.arange(start, min(start + step, target_shape[0]), dtype=np.float64)[:, None, None]
        slab_coords = coords[:, : len(i)]
        inside = np.ones(slab_coords.shape[1:], dtype=bool)
        for axis in range(3):
            np.add(rows[axis, 0] * i, in_plane[axis], out=slab_coords[axis])
            inside &= slab_coords[axis] >= -0.5
            inside &= slab_coords[axis] <= source.shape[axis] - 0.5
        if inside.any():
            slab = output[start : start + len(i)]
            ndimage.map_coordinates(
                source, slab_coords, output=slab, order=order, mode="nearest", prefilter=False
            )
            slab[~inside] = 0
    return output


def _source_axis_of_each_target_axis(rows: np.ndarray) -> list[int] | None:
    """For a target→source linear map that is a scaled permutation, the source axis each target
    axis runs along; None for any oblique map."""
    nonzero = np.abs(rows) > 1e-12 * np.abs(rows).max()
    if not (nonzero.sum(axis=0) == 1).all() or not (nonzero.sum(axis=1) == 1).all():
        return None
    return [int(np.argmax(nonzero[:, target_axis])) for target_axis in range(3)]


def _resample_axis_aligned(
    source: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    feeding: list[int],
    target_shape: tuple[int, int, int],
    order: int,
) -> np.ndarray:
    """:func:`resample_to_grid` for axis-aligned grids: per-axis indices (and weights)."""
    # the source seen in target axis order: axis t of `ordered` is the source axis feeding target axis t
    ordered = source.transpose(feeding)
    coordinates, inside = [], []
    for target_axis, source_axis in enumerate(feeding):
        # the same arithmetic as the general path, so both round identically
        c = rows[source_axis, target_axis] * np.arange(target_shape[target_axis], dtype=np.float64)
        c = c + cols[source_axis]
        coordinates.append(c)
        inside.append((c >= -0.5) & (c <= ordered.shape[target_axis] - 0.5))
    if order == 0:
        # map_coordinates' order-0 rule: floor(c + 0.5), clamped to the grid ("nearest" mode)
        index = [
            np.clip(np.floor(c + 0.5), 0, n - 1).astype(np.intp) for c, n in zip(coordinates, ordered.shape)
        ]
        output = ordered[np.ix_(*index)]
    else:
        output = np.empty(target_shape, dtype=np.float32)
        low, weight = [], []
        for c, n in zip(coordinates, ordered.shape):
            clamped = np.clip(c, 0, n - 1)
            first = np.clip(np.floor(clamped), 0, max(n - 2, 0)).astype(np.intp)
            low.append(first)
            weight.append((clamped - first).astype(np.float32))
        # a slab's largest intermediate: source plane, half-resampled plane, or target plane
        (_, s_j, s_k), (_, t_j, t_k) = ordered.shape, target_shape
        step = max(1, _SLAB_VOXELS // max(1, s_j * s_k, t_j * s_k, t_j * t_k))
        for start in range(0, target_shape[0], step):
            part = slice(start, min(start + step, target_shape[0]))
            slab = _lerp(ordered, low[0][part], weight[0][part], 0)
            slab = _lerp(slab, low[1], weight[1], 1)
            output[part] = _lerp(slab, low[2], weight[2], 2)
    for axis, mask in enumerate(inside):
        if not mask.all():
            where = [slice(None)] * 3
            where[axis] = ~mask
            output[tuple(where)] = 0
    return output


def _lerp(values: np.ndarray, low: np.ndarray, weight: np.ndarray, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` between index ``low`` and ``low + 1`` (float32)."""
    shape = [1, 1, 1]
    shape[axis] = len(low)
    w = weight.reshape(shape)
    below = np.take(values, low, axis=axis).astype(np.float32, copy=False)
    if values.shape[axis] == 1:
        return below
    above = np.take(values, low + 1, axis=axis).astype(np.float32, copy=False)
    return below + (above - below) * w
