"""Reading and writing CT volumes: NIfTI, NRRD and DICOM series as (array [i, j, k], RAS affine)."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation
from voila.data.io import atomic_path, check_ct, read_image, write_volume
from voila.errors import InputImageError, OutputError


def _affine(columns: np.ndarray, origin=(-20.0, 15.5, 7.25)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = columns
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras": _affine(np.diag([1.5, 1.5, 1.5])),
    "lps": _affine(np.diag([-0.8, -0.8, 2.0])),
    "oblique": _affine(Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix() * 1.25),
    "anisotropic_permuted": _affine(np.array([[0.0, 0.0, 3.0], [0.0, -0.7, 0.0], [0.7, 0.0, 0.0]])),
}


def _ct(shape=(9, 7, 5), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1024, 2000, size=shape).astype(np.int16)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd"])
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_write_then_read_gives_the_same_array_and_affine(tmp_path, suffix, name):
    ct = _ct()
    path = write_volume(tmp_path / f"ct{suffix}", ct, AFFINES[name])
    array, affine = read_image(path)
    assert array.dtype == np.int16
    np.testing.assert_array_equal(array, ct)
    np.testing.assert_allclose(affine, AFFINES[name], atol=1e-5)


def test_float_and_boolean_volumes_round_trip_through_nrrd_and_nifti(tmp_path):
    heatmap = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    mask = heatmap > 0.5
    for suffix in (".nrrd", ".nii.gz"):
        array, _ = read_image(write_volume(tmp_path / f"heat{suffix}", heatmap, AFFINES["oblique"]))
        np.testing.assert_array_equal(array, heatmap)
        array, _ = read_image(write_volume(tmp_path / f"mask{suffix}", mask, AFFINES["lps"]))
        np.testing.assert_array_equal(array.astype(bool), mask)


def test_nrrd_lps_geometry_is_converted_to_ras(tmp_path):
    image = sitk.GetImageFromArray(_ct().transpose(2, 1, 0))
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetSpacing((0.5, 0.75, 2.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    _, affine = read_image(tmp_path / "ct.nrrd")
    np.testing.assert_allclose(affine, _affine(np.diag([-0.5, -0.75, 2.0]), origin=(-10.0, -20.0, 30.0)))


def test_nrrd_written_by_voila_opens_in_simpleitk_with_lps_geometry(tmp_path):
    write_volume(tmp_path / "ct.nrrd", _ct(), AFFINES["ras"])
    image = sitk.ReadImage(str(tmp_path / "ct.nrrd"))
    np.testing.assert_allclose(image.GetOrigin(), (20.0, -15.5, 7.25))
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([-1.0, -1.0, 1.0]))


def test_nifti_written_with_a_reference_keeps_its_header(tmp_path):
    reference = nib.Nifti1Image(_ct(), AFFINES["ras"])
    reference.header["descrip"] = b"scanner CT"
    nib.save(reference, tmp_path / "ct.nii.gz")
    labels = np.zeros((9, 7, 5), dtype=np.uint8)
    write_volume(tmp_path / "seg.nii.gz", labels, AFFINES["ras"], reference_path=tmp_path / "ct.nii.gz")
    written = nib.load(tmp_path / "seg.nii.gz")
    assert written.header["descrip"].tobytes().startswith(b"scanner CT")
    assert written.get_data_dtype() == np.uint8


def _write_dicom_series(folder, volume, affine_lps_columns, origin, uid, description, study="1.2.3"):
    """Write one DICOM file per k-slice with SimpleITK, geometry given in LPS."""
    folder.mkdir(parents=True, exist_ok=True)
    spacing = np.linalg.norm(affine_lps_columns, axis=0)
    direction = affine_lps_columns / spacing
    image = sitk.GetImageFromArray(volume.transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(str(v) for v in (*direction[:, 0], *direction[:, 1]))
    for k in range(volume.shape[2]):
        slice_image = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0020|000d": study,
            "0020|000e": uid,
            "0008|103e": description,
            "0020|0037": orientation,
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
            "0018|0050": str(spacing[2]),
            "0008|0018": f"{uid}.{k + 1}",
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(slice_image)


@pytest.mark.parametrize("oblique", [False, True])
def test_dicom_series_folder_is_read_with_its_geometry(tmp_path, oblique):
    ct = _ct((10, 8, 6))
    rotation = Rotation.from_euler("z", 20 if oblique else 0, degrees=True).as_matrix()
    columns_lps = rotation @ np.diag([0.7, 0.7, 2.5])
    _write_dicom_series(tmp_path / "series", ct, columns_lps, (-30.0, 12.0, 100.0), "1.2.3.4.100", "abdomen")
    array, affine = read_image(tmp_path / "series")
    np.testing.assert_array_equal(array, ct)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _affine(columns_lps, origin=(-30.0, 12.0, 100.0))
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    one_file, _ = read_image(next((tmp_path / "series").glob("*.dcm")))
    np.testing.assert_array_equal(one_file, ct)


def test_folder_with_two_dicom_series_names_both_and_series_uid_picks_one(tmp_path):
    folder = tmp_path / "study"
    columns = np.diag([1.0, 1.0, 2.0])
    _write_dicom_series(folder, _ct((6, 6, 4), seed=1), columns, (0.0, 0.0, 0.0), "1.2.3.4.101", "arterial")
    _write_dicom_series(folder, _ct((6, 6, 4), seed=2), columns, (0.0, 0.0, 0.0), "1.2.3.4.102", "venous")
    with pytest.raises(InputImageError, match="series_uid") as error:
        read_image(folder)
    for text in ("1.2.3.4.101", "arterial", "1.2.3.4.102", "venous"):
        assert text in str(error.value)
    array, _ = read_image(folder, series_uid="1.2.3.4.102")
    np.testing.assert_array_equal(array, _ct((6, 6, 4), seed=2))


def test_empty_folder_says_no_dicom_series(tmp_path):
    with pytest.raises(InputImageError, match="no DICOM series"):
        read_image(tmp_path)


def test_missing_file_and_unsupported_types_are_refused(tmp_path):
    with pytest.raises(InputImageError, match="does not exist"):
        read_image(tmp_path / "nothere.nii.gz")
    for name, content in {"notes.txt": b"hello", "photo.png": b"\x89PNG\r\n\x1a\n"}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputImageError, match="unsupported file type"):
            read_image(tmp_path / name)


def test_truncated_or_corrupt_files_are_refused(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", _ct((20, 20, 20)), AFFINES["ras"])
    data = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"not a nifti at all" * 30)
    with pytest.raises(InputImageError, match="truncated or corrupt"):
        read_image(tmp_path / "junk.nii")
    (tmp_path / "junk.nrrd").write_bytes(b"NRRD0004\ngarbage\n")
    with pytest.raises(InputImageError, match="corrupt"):
        read_image(tmp_path / "junk.nrrd")


def test_images_that_are_not_one_3d_volume_are_refused(tmp_path):
    cases = {
        "slice.nii.gz": np.zeros((16, 16), dtype=np.int16),
        "single_slice.nii.gz": np.zeros((16, 16, 1), dtype=np.int16),
        "timeseries.nii.gz": np.zeros((8, 8, 8, 3), dtype=np.int16),
    }
    for name, array in cases.items():
        nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / name)
        with pytest.raises(InputImageError, match="single 3-D CT volume"):
            read_image(tmp_path / name)
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((8, 8, 8, 3), dtype=np.uint8), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector.nrrd"))
    for name in ("rgb.nii.gz", "vector.nrrd"):
        with pytest.raises(InputImageError, match="single 3-D CT volume"):
            read_image(tmp_path / name)


def test_a_trailing_singleton_fourth_axis_is_accepted(tmp_path):
    nib.save(nib.Nifti1Image(_ct()[..., None], AFFINES["ras"]), tmp_path / "ct.nii.gz")
    array, _ = read_image(tmp_path / "ct.nii.gz")
    assert array.shape == (9, 7, 5)


def test_check_ct_refuses_nan_and_sheared_grids_and_warns_for_non_ct_intensities():
    ct = np.full((8, 8, 8), -1000.0, dtype=np.float32)
    ct[2:6, 2:6, 2:6] = 400
    assert check_ct(ct, AFFINES["oblique"]) == []
    nan = ct.copy()
    nan[1, 2, 3] = np.nan
    with pytest.raises(InputImageError, match="NaN"):
        check_ct(nan, AFFINES["ras"])
    sheared = AFFINES["ras"].copy()
    sheared[0, 1] = 0.5
    with pytest.raises(InputImageError, match="resample it first"):
        check_ct(ct, sheared)
    mr_like = np.random.default_rng(0).integers(0, 1200, size=(8, 8, 8)).astype(np.int16)
    (warning,) = check_ct(mr_like, AFFINES["ras"])
    assert "Hounsfield" in warning


def test_atomic_path_leaves_nothing_behind_when_the_write_fails(tmp_path):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError), atomic_path(target) as partial:
        assert partial.parent == tmp_path and partial.name == f".seg.nii.gz.partial-{os.getpid()}.nii.gz"
        partial.write_bytes(b"half a fi")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_write_volume_replaces_the_target_only_when_complete(tmp_path):
    target = tmp_path / "seg.nii.gz"
    write_volume(target, np.zeros((4, 4, 4), dtype=np.uint8), np.eye(4))
    write_volume(target, np.ones((4, 4, 4), dtype=np.uint8), np.eye(4))
    assert read_image(target)[0].min() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    with gzip.open(target) as handle:
        assert len(handle.read()) > 0


def test_unwritable_outputs_raise_output_error(tmp_path):
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    with pytest.raises(OutputError, match="does not exist"):
        write_volume(tmp_path / "missing" / "seg.nii.gz", labels, np.eye(4))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError):
        write_volume(tmp_path / "afile" / "seg.nrrd", labels, np.eye(4))
    with pytest.raises(OutputError, match=r"\.nii\.gz"):
        write_volume(tmp_path / "seg.png", labels, np.eye(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_reported_as_output_error(tmp_path):
    with pytest.raises(OutputError, match="disk is full"), atomic_path(tmp_path / "x.bin") as partial:
        os.symlink("/dev/full", partial)
        with open(partial, "wb") as handle:
            handle.write(b"0" * 65536)
            handle.flush()
    assert list(tmp_path.iterdir()) == []


def test_scaled_integer_nifti_reads_as_float32_hounsfield_units(tmp_path):
    image = nib.Nifti1Image(np.full((4, 4, 4), 100, dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(0.5, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    array, _ = read_image(tmp_path / "scaled.nii")
    assert array.dtype == np.float32 and array.flat[0] == -974.0
