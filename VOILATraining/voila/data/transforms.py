"""Training-only random augmentation, appended to the shared deterministic preprocessing.

Patches are cropped with nnU-Net-style foreground oversampling, then rotated, zoomed and
intensity-jittered. There is no mirroring by default. Every CT is reoriented to RAS first, so
the model only ever sees anatomy the right way round, and a mirrored patch would teach it
something false: mirroring left-right puts a ``kidney_left`` where the right kidney belongs while
still calling it left; mirroring head-feet or front-back puts L3 above L1, or the spine in front of
the aorta, so the neighbourhood that tells vertebral levels and organs apart stops meaning anything.
TotalSegmentator trains its nnU-Net models without mirroring (``nnUNetTrainerNoMirroring``) for the
same reason. ``mirror=True`` adds random head-feet and front-back flips, for datasets where that
trade is wanted; left-right is never mirrored. Rotations are small, so that they stay plausible
patient poses.

>>> pipeline = training_transforms(PreprocessingConfig(), patch_size=(128, 128, 128))
>>> samples = pipeline({"image": ct_metatensor, "label": labelmap_metatensor})   # list of patches
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    SpatialPadd,
)

from voila.data.preprocess import PreprocessingConfig, deterministic_transforms

# Array axes mirrored when asked (front-back, head-feet); axis 0, left-right, never.
MIRROR_AXES = (1, 2)
# Rotation ranges (radians) about the left-right axis (array axis 0 after RAS) and the others.
ROTATION_LEFT_RIGHT_AXIS = math.radians(15.0)
ROTATION_OTHER_AXES = math.radians(8.0)


def training_transforms(
    config: PreprocessingConfig,
    patch_size: Sequence[int] = (128, 128, 128),
    foreground_oversampling: float = 0.33,
    image_key: str = "image",
    label_key: str = "label",
    num_samples: int = 1,
    mirror: bool = False,
) -> Compose:
    """Deterministic preprocessing + random patches and augmentation for training.

    Input: channel-less CT and label map (MetaTensors with RAS affines, as ``LoadImaged`` gives).
    Output: a list of ``num_samples`` dicts with ``(1, *patch_size)`` image (float32, normalised)
    and label. ``foreground_oversampling`` is the fraction of patches centred on a labelled voxel;
    the rest are centred anywhere in the (body-cropped) volume. Volumes smaller than the patch are
    padded with air (image) and background (label). ``mirror`` adds random flips along
    :data:`MIRROR_AXES` (see the module docstring for why they are off by default).
    """
    if not 0.0 <= foreground_oversampling <= 1.0:
        raise ValueError(f"foreground_oversampling must be in [0, 1], got {foreground_oversampling}")
    patch_size = tuple(int(n) for n in patch_size)
    keys = [image_key, label_key]
    return Compose(
        [
            *deterministic_transforms(config, image_key=image_key, label_keys=(label_key,)).transforms,
            SpatialPadd(image_key, spatial_size=patch_size, value=config.normalise(config.intensity_min)),
            SpatialPadd(label_key, spatial_size=patch_size, value=0),
            RandCropByPosNegLabeld(
                keys,
                label_key=label_key,
                spatial_size=patch_size,
                pos=foreground_oversampling,
                neg=1.0 - foreground_oversampling,
                num_samples=num_samples,
            ),
            *(RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in (MIRROR_AXES if mirror else ())),
            RandRotated(
                keys,
                range_x=ROTATION_LEFT_RIGHT_AXIS,
                range_y=ROTATION_OTHER_AXES,
                range_z=ROTATION_OTHER_AXES,
                prob=0.2,
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),
            ),
            RandZoomd(
                keys,
                prob=0.2,
                min_zoom=0.85,
                max_zoom=1.15,
                mode=("trilinear", "nearest"),
                padding_mode=("edge", "constant"),
            ),
            RandScaleIntensityd(image_key, factors=0.1, prob=0.15),
            RandShiftIntensityd(image_key, offsets=0.1, prob=0.15),
        ]
    )
