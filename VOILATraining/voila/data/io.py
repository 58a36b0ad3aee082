"""Read and write CT volumes as ``(array, affine)`` pairs.

A volume is a numpy array indexed ``[i, j, k]`` plus a 4×4 ``affine`` mapping ``(i, j, k, 1)`` to
world RAS millimetres (nibabel's convention). NIfTI goes through nibabel; NRRD and DICOM go through
SimpleITK, whose LPS geometry is converted to RAS here and nowhere else.

>>> ct, affine = read_image("ct.nii.gz")          # int16 stays int16
>>> warnings = check_ct(ct, affine)               # raises InputImageError for unusable volumes
>>> write_volume("seg.nrrd", labelmap, affine)    # atomic: a reader never sees half a file
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Union

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from voila import device
from voila.data.geometry import check_affine, voxel_spacing
from voila.errors import InputImageError, InsufficientMemoryError, OutputError
from voila.outputs import describe_os_error, file_suffix, temporary_name

PathLike = Union[str, "os.PathLike[str]"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".ima")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")

# Diagonal that flips the first two world axes: LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

GZIP_MAGIC = b"\x1f\x8b"
# DEFLATE cannot expand data by more than about 1032:1, so a compressed file of n bytes holds at
# most this many times n bytes of voxels: a header claiming more is corrupt or hostile.
MAX_DEFLATE_RATIO = 1100
_SERIES_DESCRIPTION_TAG = "0008|103e"
_SERIES_UID_TAG = "0020|000e"

# ITK's own warnings (e.g. "no DICOM files in folder") would print before VOILA's one-line error.
sitk.ProcessObject.SetGlobalWarningDisplay(False)


def read_image(path: PathLike, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D volume: ``(array [i, j, k] in the file's dtype, 4×4 voxel→RAS affine)``.

    ``path`` is a NIfTI file (``.nii``/``.nii.gz``), an ITK file (``.nrrd``/``.nhdr``/``.mha``/
    ``.mhd``), a DICOM series folder or one file of a DICOM series. ``series_uid`` picks one series
    from a folder that holds several.
    """
    path = Path(path)
    _check_readable(path)
    if path.is_dir():
        array, affine = _read_dicom_folder(path, series_uid)
    else:
        suffix = file_suffix(path)
        if suffix in NIFTI_SUFFIXES:
            array, affine = _read_nifti(path)
        elif suffix in ITK_SUFFIXES:
            array, affine = _read_itk_file(path)
        elif suffix in DICOM_SUFFIXES:
            array, affine = _read_dicom_folder(path.parent, series_uid or _dicom_series_uid(path))
        else:
            raise InputImageError(
                f"cannot read {path.name}: unsupported file type {suffix or '(none)'}; "
                "give a NIfTI (.nii/.nii.gz), NRRD (.nrrd) file or a DICOM series folder"
            )
    return _as_volume(array, path), affine


def check_volume(array: np.ndarray, affine: np.ndarray, what: str = "the image") -> None:
    """The one structural check of an input volume: a numeric 3-D array (no single slice, no time
    series, no RGB) on a usable grid (:func:`voila.data.geometry.check_affine`).

    Raises :class:`InputImageError` saying what to do.
    """
    _check_array(np.asarray(array), what)
    check_affine(affine, what)


def _check_array(array: np.ndarray, what: str) -> None:
    if array.dtype.names is not None:
        raise InputImageError(f"{what} is an RGB/vector image; VOILA needs a single 3-D CT volume")
    if array.ndim > 3:
        raise InputImageError(
            f"{what} has shape {array.shape} (a 4-D, time series or vector image); "
            "VOILA needs a single 3-D CT volume"
        )
    if array.ndim < 3 or min(array.shape) < 2:
        raise InputImageError(
            f"{what} has shape {array.shape}, a 2-D image or single slice; VOILA needs a single 3-D CT volume"
        )
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise InputImageError(f"{what} has voxel type {array.dtype}; a CT needs numeric voxels")


def check_ct(array: np.ndarray, affine: np.ndarray, what: str = "the image") -> list[str]:
    """:func:`check_volume`, then the content: raise for NaN/Inf voxels, return warnings for
    intensities that do not look like Hounsfield units."""
    check_volume(array, affine, what)
    if np.issubdtype(array.dtype, np.floating):
        for slab in _slabs(array):
            if not np.all(np.isfinite(slab)):
                raise InputImageError(
                    f"{what} contains NaN or infinite voxels; replace them (e.g. with -1000) first"
                )
    warnings: list[str] = []
    low, high = float(array.min()), float(array.max())
    if low > -500 or high < 300:
        warnings.append(
            f"intensities {low:.0f}..{high:.0f} do not look like CT in Hounsfield units "
            "(expected air near -1000 and bone above 300); VOILA is trained on CT, results may be wrong"
        )
    return warnings


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it into place only if the block succeeds.

    The temporary file is ``<dir>/.<name>.partial-<pid><suffix>`` (same folder, so ``os.replace``
    is atomic; same suffix, so writers pick the right format). On any exception it is deleted and
    ``path`` is left untouched. OS errors become :class:`OutputError` with a message saying what to do.
    For several files that must appear together, use :class:`voila.outputs.OutputSet`.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"output folder {folder} does not exist; create it or choose another output")
    if not os.access(folder, os.W_OK):
        raise OutputError(f"output folder {folder} is not writable; choose another output folder")
    partial = temporary_name(path)
    try:
        yield partial
        os.replace(partial, path)
    except OSError as error:
        _remove_quietly(partial)
        raise OutputError(describe_os_error(error, path)) from error
    except BaseException:
        _remove_quietly(partial)
        raise


def write_volume(
    path: PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    reference_path: PathLike | None = None,
    atomic: bool = True,
) -> Path:
    """Write ``array`` (indexed ``[i, j, k]``) with its voxel→RAS ``affine``; format from the extension.

    ``.nii``/``.nii.gz`` are written by nibabel, ``.nrrd``/``.mha`` by SimpleITK (RAS→LPS converted,
    compressed). For NIfTI, ``reference_path`` (the NIfTI the volume was computed from) lends its
    header — description, units, qform/sform codes — so both files look alike to other tools.
    The write is atomic (:func:`atomic_path`) unless ``atomic`` is False (``path`` is then already a
    temporary file of an :class:`voila.outputs.OutputSet`). Returns ``Path(path)``.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise OutputError(f"cannot write {path.name}: choose a .nii.gz, .nii, .nrrd or .mha file name")
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if array.ndim != 3 or affine.shape != (4, 4):
        raise ValueError(f"expected a 3-D array and a 4x4 affine, got {array.shape} and {affine.shape}")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    with atomic_path(path) if atomic else contextlib.nullcontext(path) as partial:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(partial, array, affine, reference_path)
        else:
            _write_itk(partial, array, affine)
    return path


def _check_readable(path: Path) -> None:
    """A missing path and an unreadable one are different problems with different fixes."""
    try:
        path.stat()
    except PermissionError:
        raise InputImageError(f"cannot read {path}: permission denied; check its permissions") from None
    except OSError:
        raise InputImageError(f"image {path} does not exist; check the path") from None
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise InputImageError(f"cannot read {path}: permission denied; check its permissions")


def check_image_size(name: str, voxels: int, bytes_per_voxel: int, stored_bytes: int | None = None) -> None:
    """Before any voxel is read: refuse a header whose size its file cannot hold (``stored_bytes``,
    the most its content can expand to) or this machine cannot hold in memory."""
    needed = int(voxels) * int(bytes_per_voxel)
    if stored_bytes is not None and needed > stored_bytes:
        raise InputImageError(
            f"cannot read {name}: its header describes {voxels:,} voxels ({device.format_bytes(needed)}) "
            "but the file is far too small to hold them; the file is truncated or corrupt: export it again"
        )
    available = device.available_memory_bytes()
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"{name} holds {voxels:,} voxels ({device.format_bytes(needed)}) but "
            f"{device.format_bytes(available)} of memory are available; crop the volume to the region "
            "of interest or use a larger machine"
        )


def _check_nifti_header(path: Path) -> None:
    """The raw NIfTI header, before nibabel reads (and quietly "fixes") it."""
    with open(path, "rb") as handle:
        start = handle.read(348)
    gzipped = start[:2] == GZIP_MAGIC
    plain_nifti = (
        len(start) == 348
        and start[344:347] in (b"n+1", b"ni1")
        and (int.from_bytes(start[:4], "little") == 348 or int.from_bytes(start[:4], "big") == 348)
    )
    if path.name.lower().endswith(".gz") != gzipped and (gzipped or plain_nifti):
        actual = "gzip-compressed" if gzipped else "not gzip-compressed"
        right = ".nii.gz" if gzipped else ".nii"
        raise InputImageError(
            f"cannot read {path.name}: the file is {actual} but its name says otherwise; rename it to "
            f"end in {right}"
        )
    try:
        with nib.openers.ImageOpener(str(path)) as handle:
            header = nib.Nifti1Header.from_fileobj(handle, check=False)
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        slope, _ = header.get_slope_inter()
    except Exception as error:
        raise InputImageError(
            f"cannot read {path.name}: the NIfTI file is truncated or corrupt ({_short(error)}); export it again"
        ) from None
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(len(shape), 3)]]
    if int(header["sform_code"]) == 0 and any(v == 0 or not np.isfinite(v) for v in pixdim):
        raise InputImageError(
            f"{path.name} has a zero voxel size in its header (pixdim {pixdim}); fix the voxel "
            "spacing (e.g. re-export it, or set the spacing in Slicer's Volumes module)"
        )
    voxels = int(np.prod(shape)) if shape else 0
    needed = int(header.get_data_offset()) + voxels * itemsize
    size = path.stat().st_size
    if gzipped:
        with open(path, "rb") as handle:  # ISIZE: the uncompressed length modulo 2**32
            handle.seek(-4, os.SEEK_END)
            uncompressed = int.from_bytes(handle.read(4), "little")
        if (needed < 2**32 and uncompressed < needed) or needed > size * MAX_DEFLATE_RATIO:
            raise InputImageError(
                f"cannot read {path.name}: the NIfTI file is truncated or corrupt (its header describes "
                f"{voxels:,} voxels that its compressed data cannot hold); export it again"
            )
    elif size < needed:
        raise InputImageError(
            f"cannot read {path.name}: the NIfTI file is truncated or corrupt ({size:,} bytes, its "
            f"header needs {needed:,}); export it again"
        )
    scaled = slope is not None and np.isfinite(slope) and slope not in (0.0, 1.0)
    check_image_size(path.name, voxels, max(itemsize, 8 if scaled else itemsize))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    _check_nifti_header(path)
    try:
        # No memory map: it would keep the file open (and locked on Windows) after reading.
        image = nib.load(str(path), mmap=False)
        # dataobj keeps the on-disk dtype unless the header asks for scaling (then float).
        array = np.asanyarray(image.dataobj)
        if array.dtype == np.float64 and image.get_data_dtype().kind in "iu":
            array = array.astype(np.float32)  # scaled integers: float32 holds HU exactly, at half the memory
    except Exception as error:
        raise InputImageError(
            f"cannot read {path.name}: the NIfTI file is truncated or corrupt ({_short(error)}); "
            "export it again"
        ) from error
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputImageError(
            f"cannot read {path.name}: the file is truncated, corrupt or not an image; export it again"
        ) from error
    voxels = int(np.prod(reader.GetSize()))
    itemsize = sitk.GetArrayViewFromImage(
        sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())
    ).itemsize
    detached = file_suffix(path) in (".nhdr", ".mhd")  # the voxels live in another file
    stored = None if detached else path.stat().st_size * MAX_DEFLATE_RATIO
    check_image_size(path.name, voxels, itemsize * reader.GetNumberOfComponents(), stored)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputImageError(
            f"cannot read {path.name}: the file is truncated, corrupt or not an image; export it again"
        ) from error
    return _from_sitk(image, path.name)


def _dicom_series_uid(path: Path) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputImageError(f"cannot read {path.name} as DICOM; give the DICOM series folder") from error
    if not reader.HasMetaDataKey(_SERIES_UID_TAG):
        raise InputImageError(f"{path.name} has no series UID; give the DICOM series folder")
    return reader.GetMetaData(_SERIES_UID_TAG).strip()


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[np.ndarray, np.ndarray]:
    series = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    if not series:
        raise InputImageError(
            f"no DICOM series found in folder {folder}; give a folder of DICOM slices or an image file"
        )
    if series_uid is None:
        if len(series) > 1:
            listed = "; ".join(f"{uid} ({_series_description(folder, uid)})" for uid in series)
            raise InputImageError(
                f"folder {folder} holds {len(series)} DICOM series: {listed}; "
                "choose one with --series-uid UID (Python: series_uid=UID) or give the folder of one series"
            )
        series_uid = series[0]
    elif series_uid not in series:
        raise InputImageError(f"DICOM series {series_uid} is not in {folder}; available: {', '.join(series)}")
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputImageError(
            f"cannot read DICOM series {series_uid} in {folder} (missing or corrupt slices); "
            "export the series again"
        ) from error
    return _from_sitk(image, f"DICOM series {series_uid}")


def _series_description(folder: Path, uid: str) -> str:
    first = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)[0]
    reader = sitk.ImageFileReader()
    reader.SetFileName(first)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return "unreadable"
    if reader.HasMetaDataKey(_SERIES_DESCRIPTION_TAG):
        return reader.GetMetaData(_SERIES_DESCRIPTION_TAG).strip() or "no description"
    return "no description"


def _from_sitk(image: sitk.Image, name: str) -> tuple[np.ndarray, np.ndarray]:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{name} is an RGB/vector image; VOILA needs a single 3-D CT volume")
    dimension = image.GetDimension()
    # SimpleITK arrays are [k, j, i]; reverse to [i, j, k].
    array = sitk.GetArrayFromImage(image).transpose(tuple(range(dimension))[::-1])
    if dimension > 3:
        raise InputImageError(
            f"{name} is a {dimension}-D image (e.g. a time series); VOILA needs a single 3-D CT volume"
        )
    if dimension < 3:
        return array, np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    lps[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ lps


def _as_volume(array: np.ndarray, path: Path) -> np.ndarray:
    """Drop trailing singleton axes beyond the third; refuse anything that is not a 3-D volume."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    _check_array(array, path.name)
    return array


def _write_nifti(
    partial: Path, array: np.ndarray, affine: np.ndarray, reference_path: PathLike | None
) -> None:
    header = None
    if reference_path is not None and file_suffix(reference_path) in NIFTI_SUFFIXES:
        header = nib.load(str(reference_path)).header.copy()
        header.set_slope_inter(1.0, 0.0)
    # nibabel refuses int64 without an explicit on-disk type; labels and HU fit in int32.
    dtype = np.int32 if array.dtype == np.int64 and _fits(array, np.int32) else array.dtype
    image = nib.Nifti1Image(array, affine, header=header, dtype=dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(partial))


def _write_itk(partial: Path, array: np.ndarray, affine: np.ndarray) -> None:
    if array.dtype == np.int64 and _fits(array, np.int32):
        array = array.astype(np.int32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    lps = LPS_TO_RAS @ affine
    spacing = voxel_spacing(lps)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    try:
        sitk.WriteImage(image, str(partial), True)
    except RuntimeError as error:
        code = errno.ENOSPC if "space" in str(error).lower() else errno.EIO
        raise OSError(code, f"SimpleITK could not write the file ({_short(error)})") from error


def _fits(array: np.ndarray, dtype: type) -> bool:
    info = np.iinfo(dtype)
    return array.size == 0 or (int(array.min()) >= info.min and int(array.max()) <= info.max)


def _slabs(array: np.ndarray, voxels: int = 1 << 24) -> Iterator[np.ndarray]:
    step = max(1, voxels // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        yield array[start : start + step]


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:160] + ("…" if len(text) > 160 else "")
