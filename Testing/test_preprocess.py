"""The shared preprocessing (RAS, 1.5 mm, clip + z-score, body crop) and the way back to any grid."""

from __future__ import annotations

import pickle
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.spatial.transform import Rotation
from voila.data.io import read_image
from voila.data.preprocess import (
    PreprocessingConfig,
    deterministic_transforms,
    preprocess_volume,
    resample_to_grid,
    to_metatensor,
)
from voila.data.transforms import training_transforms
from voila.errors import ConfigError

CONFIG = PreprocessingConfig()
LEFT, RIGHT = 1, 2


def _grid_affine(shape, spacing, rotation=None) -> np.ndarray:
    """Voxel -> RAS affine of a grid of ``shape`` centred on the world origin."""
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


def _world_object(shape, affine):
    """A body with a structure on the patient's left (RAS -x) and one on the right (RAS +x)."""
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    x, y, z = np.moveaxis(ijk @ affine[:3, :3].T + affine[:3, 3], -1, 0)
    body = (x / 40) ** 2 + (y / 30) ** 2 + (z / 45) ** 2 <= 1
    left = ((x + 18) / 10) ** 2 + (y / 9) ** 2 + (z / 14) ** 2 <= 1
    right = ((x - 16) / 12) ** 2 + ((y - 5) / 10) ** 2 + ((z - 4) / 16) ** 2 <= 1
    ct = np.where(body, 40, -1000).astype(np.int16)
    ct[left] = 60
    ct[right] = 150
    labels = np.zeros(shape, dtype=np.uint8)
    labels[left] = LEFT
    labels[right] = RIGHT
    return ct, labels


def _ras_variant():
    shape = (64, 52, 70)
    affine = _grid_affine(shape, (1.5, 1.5, 1.5))
    return (*_world_object(shape, affine), affine)


def _lps_variant():
    """The RAS grid with its first two array axes reversed (as an LPS-stored file gives)."""
    ct, labels, affine = _ras_variant()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.asarray(ct.shape[:2]) - 1
    return ct[::-1, ::-1].copy(), labels[::-1, ::-1].copy(), affine @ flip


def _oblique_variant():
    shape = (70, 60, 72)
    rotation = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
    affine = _grid_affine(shape, (1.4, 1.4, 1.4), rotation)
    return (*_world_object(shape, affine), affine)


def _anisotropic_permuted_variant():
    """0.7 x 0.7 x 3 mm, stored [k, j, i] with LPS-like signs (Slicer's arrayFromVolume order)."""
    shape = (32, 140, 124)
    columns = np.array([[0.0, 0.0, -0.7], [0.0, -0.7, 0.0], [3.0, 0.0, 0.0]])
    affine = _grid_affine(shape, (1.0, 1.0, 1.0), columns)
    return (*_world_object(shape, affine), affine)


VARIANTS = {
    "ras": _ras_variant,
    "lps": _lps_variant,
    "oblique": _oblique_variant,
    "anisotropic_permuted": _anisotropic_permuted_variant,
}


def _to_model_grid(ct, labels, affine):
    data = {
        "image": MetaTensor(torch.from_numpy(ct.astype(np.float32)), affine=torch.from_numpy(affine)),
        "label": MetaTensor(torch.from_numpy(labels), affine=torch.from_numpy(affine)),
    }
    out = deterministic_transforms(CONFIG, label_keys=("label",))(data)
    return out["image"], out["label"]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_labels_round_trip_to_the_input_grid_whatever_its_orientation(variant):
    ct, labels, affine = VARIANTS[variant]()
    image, model_labels = _to_model_grid(ct, labels, affine)
    model_affine = np.asarray(image.affine)
    assert nib.aff2axcodes(model_affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(model_affine[:3, :3], axis=0), CONFIG.spacing, atol=1e-6)

    back = resample_to_grid(model_labels[0].numpy().astype(np.uint8), model_affine, ct.shape, affine, order=0)
    assert back.shape == ct.shape and back.dtype == np.uint8
    for label in (LEFT, RIGHT):
        assert _dice(back == label, labels == label) > 0.9


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_patients_left_stays_left_on_the_model_grid(variant):
    ct, labels, affine = VARIANTS[variant]()
    _, model_labels = _to_model_grid(ct, labels, affine)
    # Model grid axis 0 is RAS x: a larger index is further towards the patient's right.
    left, right = (np.nonzero(model_labels[0].numpy() == label)[0].mean() for label in (LEFT, RIGHT))
    assert left < right


def test_a_flipped_input_gives_the_same_model_volume_and_a_flipped_output():
    ct, labels, affine = _ras_variant()
    ct_lps, labels_lps, affine_lps = _lps_variant()
    ras = preprocess_volume(ct, affine, CONFIG)
    lps = preprocess_volume(ct_lps, affine_lps, CONFIG)
    assert torch.equal(ras.image, lps.image)
    np.testing.assert_allclose(ras.affine, lps.affine, atol=1e-9)
    model_mask = (ras.image[0].numpy() > CONFIG.normalise(100)).astype(np.uint8)
    back_ras = resample_to_grid(model_mask, ras.affine, ct.shape, affine, order=0)
    back_lps = resample_to_grid(model_mask, lps.affine, ct_lps.shape, affine_lps, order=0)
    np.testing.assert_array_equal(back_lps, back_ras[::-1, ::-1])
    assert _dice(back_ras > 0, labels == RIGHT) > 0.95


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int32, np.float64])
def test_any_voxel_type_gives_exactly_the_float32_model_volume(dtype):
    """int16 goes through reorientation and crop as int16 (half the bytes); the result is identical."""
    ct, _, affine = _lps_variant()  # LPS storage: the reorientation really flips
    ct = ct - ct.min() if dtype == np.uint16 else ct
    reference = preprocess_volume(ct.astype(np.float32), affine, CONFIG)
    volume = preprocess_volume(ct.astype(dtype), affine, CONFIG)
    assert volume.image.dtype == torch.float32
    assert torch.equal(volume.image, reference.image)
    np.testing.assert_array_equal(volume.affine, reference.affine)


def test_intensities_are_clipped_and_normalised_with_the_fixed_ct_statistics():
    assert CONFIG.normalise(-104.44) == 0.0
    assert CONFIG.normalise(-3000) == pytest.approx((-1003 + 104.44) / 505.35)
    assert CONFIG.normalise(5000) == pytest.approx((1546 + 104.44) / 505.35)
    hu = np.zeros((12, 12, 12), dtype=np.float32)
    hu[:, :, :3], hu[:, :, 3:6], hu[:, :, 6:9], hu[:, :, 9:] = -3000, -104.44, 400, 5000
    volume = preprocess_volume(hu, np.diag([1.5, 1.5, 1.5, 1.0]), CONFIG)
    centre_values = volume.image[0, 6, 6, [1, 4, 7, 10]].numpy()
    np.testing.assert_allclose(
        centre_values, [CONFIG.normalise(v) for v in (-1003, -104.44, 400, 1546)], atol=1e-5
    )


def test_crop_keeps_the_body_and_drops_the_surrounding_air():
    ct, _, affine = _ras_variant()
    padded = np.full((120, 120, 120), -1000, dtype=np.int16)
    padded[10:74, 30:82, 20:90] = ct
    padded_affine = affine.copy()
    padded_affine[:3, 3] -= affine[:3, :3] @ np.array([10, 30, 20])
    cropped, uncropped = (
        preprocess_volume(ct, affine, CONFIG),
        preprocess_volume(padded, padded_affine, CONFIG),
    )
    assert uncropped.image.shape == cropped.image.shape
    np.testing.assert_allclose(uncropped.affine, cropped.affine, atol=1e-6)
    air = preprocess_volume(np.full((8, 8, 8), -1000, np.int16), np.eye(4), CONFIG)
    assert air.image.numel() > 0


def test_preprocessing_config_round_trips_and_rejects_unknown_keys():
    config = PreprocessingConfig(spacing=(2.0, 2.0, 3.0), foreground_threshold=-400.0)
    assert PreprocessingConfig.from_dict(config.to_dict()) == config
    assert PreprocessingConfig.from_dict({"spacing": 1.0}).spacing == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="unknown preprocessing keys"):
        PreprocessingConfig.from_dict({"spacng": [1, 1, 1]})


def test_resample_to_grid_is_exact_through_affines_and_zero_outside():
    values = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    affine = _grid_affine(values.shape, (2.0, 1.0, 3.0))
    np.testing.assert_array_equal(resample_to_grid(values, affine, values.shape, affine, 1), values)
    labels = values.astype(np.uint16)
    np.testing.assert_array_equal(resample_to_grid(labels, affine, values.shape, affine, 0), labels)
    # A twice finer target halfway between source voxels interpolates linearly.
    finer = affine @ np.diag([0.5, 1.0, 1.0, 1.0])
    resampled = resample_to_grid(values, affine, (7, 5, 6), finer, 1)
    np.testing.assert_allclose(resampled[1], (values[0] + values[1]) / 2)
    # A target extending beyond the source gets zeros there.
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, :3] @ np.array([3, 0, 0])
    outside = resample_to_grid(labels, affine, (10, 5, 6), shifted, 0)
    assert not outside[:2].any() and not outside[-3:].any()
    np.testing.assert_array_equal(outside[3:7], labels)


@pytest.mark.parametrize("case", range(12))
def test_axis_aligned_resampling_equals_the_general_path(case):
    """The per-axis fast path (scaled permutations: flips, axis swaps, other spacings, offsets,
    targets partly outside the source) gives what map_coordinates gives: labels exactly,
    values to float32 rounding. Exact half-voxel ties (twice finer grids) are included."""
    from voila.data.preprocess import _resample_general

    rng = np.random.default_rng(case)
    source_shape = tuple(int(n) for n in rng.integers(5, 14, size=3))
    values = rng.random(source_shape).astype(np.float32)
    labels = rng.integers(0, 7, size=source_shape).astype(np.uint8)
    source_affine = _grid_affine(source_shape, tuple(rng.choice([0.8, 1.5, 2.0, 3.0], size=3)))
    permutation = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=3)[:, None]
    ties = case % 3 == 0  # a twice finer target whose voxel centres fall on source voxel boundaries
    scales = np.full(3, 0.5) if ties else rng.choice([0.5, 0.75, 1.0, 1.3, 2.0], size=3)
    target_to_source = np.eye(4)
    target_to_source[:3, :3] = permutation * scales[None, :]
    target_shape = tuple(int(n) for n in rng.integers(6, 20, size=3))
    # the target's centre near the source's centre, so they overlap but the target sticks out
    centre = (np.asarray(source_shape) - 1) / 2 + rng.uniform(-3, 3, size=3)
    origin = centre - target_to_source[:3, :3] @ ((np.asarray(target_shape) - 1) / 2)
    target_to_source[:3, 3] = np.round(origin * 2) / 2 if ties else origin
    target_affine = source_affine @ target_to_source
    to_source = np.linalg.inv(source_affine) @ target_affine
    rows, cols = to_source[:3, :3], to_source[:3, 3]

    fast_labels = resample_to_grid(labels, source_affine, target_shape, target_affine, 0)
    np.testing.assert_array_equal(fast_labels, _resample_general(labels, rows, cols, target_shape, 0))
    assert fast_labels.dtype == np.uint8 and fast_labels.any()
    fast_values = resample_to_grid(values, source_affine, target_shape, target_affine, 1)
    general = _resample_general(values, rows, cols, target_shape, 1)
    assert fast_values.dtype == np.float32
    np.testing.assert_allclose(fast_values, general, atol=1e-5)


def test_resample_to_grid_memory_beyond_the_output_is_bounded():
    values = np.random.default_rng(0).random((40, 40, 30)).astype(np.float32)
    source = _grid_affine(values.shape, (10.0, 10.0, 10.0))
    target_shape = (512, 512, 48)
    target = _grid_affine(target_shape, (0.7, 0.7, 6.0))
    tracemalloc.start()
    output = resample_to_grid(values, source, target_shape, target, order=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert output.shape == target_shape
    assert np.count_nonzero(output) == output.size  # the target lies inside the source everywhere
    assert peak - output.nbytes < 300 * 2**20


def test_resample_to_grid_memory_is_bounded_when_the_source_planes_are_larger():
    """A thin target column through a large source: the per-axis path must not hold one source
    plane per target row (here that would be 256 × 1000² float32 = 1 GB)."""
    values = np.ones((256, 1000, 1000), dtype=np.float32)
    source = _grid_affine(values.shape, (1.0, 1.0, 1.0))
    target_shape = (256, 2, 2)
    target = _grid_affine(target_shape, (1.0, 1.0, 1.0))
    tracemalloc.start()
    output = resample_to_grid(values, source, target_shape, target, order=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    np.testing.assert_allclose(output, 1.0)
    assert peak < 100 * 2**20


def test_real_ct_liver_round_trips_to_the_input_grid(resources):
    folder = resources / "SampleData" / "totalseg-example"
    ct, affine = read_image(folder / "example_ct_sm.nii.gz")
    liver, _ = read_image(folder / "example_seg_fast" / "liver.nii.gz")
    assert liver.any()
    image, model_liver = _to_model_grid(ct, liver.astype(np.uint8), affine)
    np.testing.assert_allclose(np.abs(np.diag(np.asarray(image.affine))[:3]), (1.5, 1.5, 1.5))
    assert np.all(np.abs(np.subtract(image.shape[1:], [2 * n for n in ct.shape])) <= 12)
    back = resample_to_grid(
        model_liver[0].numpy().astype(np.uint8), np.asarray(image.affine), ct.shape, affine, 0
    )
    assert _dice(back > 0, liver > 0) > 0.97


def test_training_transforms_give_patches():
    ct, labels, affine = _ras_variant()
    pipeline = training_transforms(
        CONFIG, patch_size=(72, 80, 80), foreground_oversampling=1.0, num_samples=1
    )
    pipeline.set_random_state(seed=0)
    for _ in range(4):
        (sample,) = pipeline(
            {
                "image": MetaTensor(torch.from_numpy(ct.astype(np.float32)), affine=torch.from_numpy(affine)),
                "label": MetaTensor(torch.from_numpy(labels), affine=torch.from_numpy(affine)),
            }
        )
        assert sample["image"].shape == (1, 72, 80, 80) and sample["label"].shape == (1, 72, 80, 80)
        assert sample["image"].dtype == torch.float32
        label = sample["label"][0].numpy()
        left, right = (np.nonzero(label == value)[0].mean() for value in (LEFT, RIGHT))
        assert left < right


@pytest.mark.parametrize("mirror", [False, True])
def test_training_augmentation_mirrors_only_when_asked_and_never_left_right(mirror):
    """Two blobs, one at lower index than the other on every axis, through 40 augmented patches.
    By default they stay in that order on every axis (no mirror: a mirror along any axis would
    swap them in about half of the draws); with ``mirror`` the front-back and head-feet orders
    swap sometimes, the left-right order (array axis 0 after RAS) never."""
    shape = (40, 40, 40)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    ct = np.full(shape, 40.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.float32)
    labels[8:16, 8:16, 8:16] = 1
    labels[24:32, 24:32, 24:32] = 2
    ct[labels > 0] = 200.0
    pipeline = training_transforms(CONFIG, patch_size=shape, foreground_oversampling=1.0, mirror=mirror)
    pipeline.set_random_state(seed=3)
    swapped = np.zeros(3, dtype=bool)
    for _ in range(40):
        (sample,) = pipeline(
            {
                "image": MetaTensor(torch.from_numpy(ct), affine=torch.from_numpy(affine)),
                "label": MetaTensor(torch.from_numpy(labels), affine=torch.from_numpy(affine)),
            }
        )
        label = np.asarray(sample["label"][0])
        first, second = (np.argwhere(np.rint(label) == value).mean(axis=0) for value in (1, 2))
        swapped |= first > second
    assert list(swapped) == [False, mirror, mirror]


def test_training_pipeline_can_be_sent_to_data_loader_workers():
    pipeline = pickle.loads(pickle.dumps(training_transforms(CONFIG, patch_size=(32, 32, 32))))
    ct, labels, affine = _ras_variant()
    (sample,) = pipeline({"image": to_metatensor(ct, affine), "label": to_metatensor(labels, affine)})
    assert sample["image"].shape == (1, 32, 32, 32)
