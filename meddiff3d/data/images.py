"""Reading and checking image volumes: NIfTI, NRRD/MetaImage and DICOM series, always with a RAS affine.

Every reader here returns the voxel array in file index order ``(i, j, k)`` together with a 4x4 affine that maps
``(i, j, k, 1)`` to RAS world coordinates in mm (nibabel's convention). ITK and SimpleITK describe geometry in LPS
(``origin``, ``spacing``, ``direction``); the conversion is ``affine_RAS = diag(-1, -1, 1, 1) @ affine_LPS``, with
``affine_LPS[:3, :3] = direction @ diag(spacing)`` and ``affine_LPS[:3, 3] = origin``.

Supported inputs:

- NIfTI ``.nii`` / ``.nii.gz`` via nibabel;
- NRRD ``.nrrd`` / ``.nhdr`` and MetaImage ``.mha`` / ``.mhd`` via SimpleITK;
- a DICOM series: a folder holding exactly one series, via SimpleITK's ``ImageSeriesReader`` (GDCM sorts the slices).

Dimensionality: meddiff3d works on 3D volumes. Trailing singleton dimensions beyond the third (``x, y, z, 1`` as
written by many tools) are squeezed; a true 4D volume (``x, y, z, t`` with ``t > 1``), a 2D image, or a volume with a
single slice is rejected with :class:`~meddiff3d.errors.ImageError`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meddiff3d.checks import check_memory, check_voxels
from meddiff3d.errors import ImageError, InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: tolerance (mm) when comparing the affines of two images that must share one voxel grid
GRID_ATOL_MM = 1e-3
#: plausible voxel spacing (mm, every axis) of an image to detect or segment in (``check_image(content=True)``):
#: finer than 0.1 mm or coarser than 10 mm is a header in the wrong units, or not a brain MRI
SPACING_RANGE_MM = (0.1, 10.0)
#: memory of reading one voxel (nibabel may scale the stored values to float64), for the check before reading
READ_BYTES_PER_VOXEL = 8
#: centre (RAS mm) of the MNI-like box every generated volume covers when the training data has no common grid
MNI_BOX_CENTRE_MM = (-0.5, -16.5, 5.5)


@dataclass(frozen=True)
class ImageInfo:
    """Geometry of a 3D volume: spatial ``shape``, RAS ``affine`` (4x4) and the detected ``format``."""

    path: Path
    shape: tuple[int, int, int]
    affine: np.ndarray
    format: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def image_format(path: str | os.PathLike) -> str:
    """``"nifti"``, ``"itk"`` (NRRD/MetaImage) or ``"dicom"`` (a folder); raises :class:`ImageError` otherwise."""
    path = Path(path)
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    raise ImageError(
        f"{path}: unsupported image format; expected NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage "
        f"(.mha, .mhd) or a folder holding a DICOM series"
    )


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise ImageError(f"{path}: file not found")


# --------------------------------------------------------------------------------------------------------- SimpleITK
def sitk_geometry_to_ras_affine(spacing, origin, direction) -> np.ndarray:
    """The RAS affine of an ITK/SimpleITK 3D image from its LPS ``spacing``, ``origin`` and flat ``direction``."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return LPS_TO_RAS @ lps


def ras_affine_to_sitk_geometry(affine) -> tuple[tuple, tuple, tuple]:
    """Inverse of :func:`sitk_geometry_to_ras_affine`: ``(spacing, origin, direction)`` in ITK's LPS convention."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return tuple(spacing.tolist()), tuple(lps[:3, 3].tolist()), tuple(direction.ravel().tolist())


def read_sitk(path: str | os.PathLike):
    """A SimpleITK image from a file or a DICOM series folder (exactly one series); raises :class:`ImageError`."""
    import SimpleITK as sitk

    path = Path(path)
    _require_exists(path)
    try:
        if path.is_dir():
            series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path))
            if len(series) != 1:
                raise ImageError(
                    f"{path}: folder holds {len(series)} DICOM series; expected exactly one (point to its own folder)"
                )
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except ImageError:
        raise
    except Exception as err:  # SimpleITK raises RuntimeError with a long ITK trace
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ImageError(f"{path}: unreadable image ({first})") from err


def sitk_to_array(image) -> tuple[np.ndarray, np.ndarray]:
    """``(array in (i, j, k[, c]) order, RAS affine)`` of a 3D SimpleITK image (vector pixels -> trailing axis)."""
    import SimpleITK as sitk

    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise ImageError(f"expected a 3D image, got a {image.GetDimension()}D image of size {image.GetSize()}")
    array = sitk.GetArrayFromImage(image)  # (k, j, i[, c])
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0))
    return array, sitk_geometry_to_ras_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def array_to_sitk(array, affine):
    """A 3D SimpleITK image from an ``(i, j, k)`` array and its RAS affine (the inverse of :func:`sitk_to_array`)."""
    import SimpleITK as sitk

    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"array_to_sitk needs a 3D array, got shape {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    spacing, origin, direction = ras_affine_to_sitk_geometry(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


# ------------------------------------------------------------------------------------------------------------ public
def _squeeze_to_3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3:
        raise ImageError(f"{path}: image is {len(shape)}D (shape {shape}); a 3D volume is required")
    if len(shape) > 3:
        raise ImageError(
            f"{path}: image is {len(shape)}D (shape {shape}); a 3D volume is required (a 4D image is accepted only "
            f"when its extra dimensions have size 1)"
        )
    if min(shape) < 2:
        raise ImageError(f"{path}: image has a single slice (shape {shape}); a 3D volume is required")
    return shape  # type: ignore[return-value]


def _nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as err:
        raise ImageError(f"{path}: unreadable NIfTI header ({type(err).__name__}: {err})") from err


def read_header(path: str | os.PathLike) -> ImageInfo:
    """Geometry of an image without reading its voxels (DICOM series are read whole); raises :class:`ImageError`."""
    path = Path(path)
    _require_exists(path)
    fmt = image_format(path)
    if fmt == "nifti":
        img = _nifti(path)
        return ImageInfo(path, _squeeze_to_3d(path, img.shape), np.asarray(img.affine, np.float64), fmt)
    if fmt == "itk":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except Exception as err:
            raise ImageError(f"{path}: unreadable image header ({str(err).strip().splitlines()[-1]})") from err
        components = reader.GetNumberOfComponents()
        size = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
        shape = _squeeze_to_3d(path, size)
        dim = reader.GetDimension()
        if dim != 3:  # a 4D file with a singleton 4th axis: keep the spatial 3x3 part of the geometry
            direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
            return ImageInfo(path, shape, sitk_geometry_to_ras_affine(reader.GetSpacing()[:3],
                                                                      reader.GetOrigin()[:3], direction), fmt)
        return ImageInfo(path, shape, sitk_geometry_to_ras_affine(reader.GetSpacing(), reader.GetOrigin(),
                                                                  reader.GetDirection()), fmt)
    array, affine = read_image(path)
    return ImageInfo(path, array.shape, affine, fmt)


def _check_size(path: Path, shape: Sequence[int]) -> None:
    """A header's voxel count within :data:`~meddiff3d.checks.MAX_VOXELS` and the memory limit, before reading."""
    try:
        voxels = check_voxels(f"{path}: image of shape", [int(s) for s in shape])
        check_memory(f"reading {path}", READ_BYTES_PER_VOXEL * voxels)
    except InputError as err:
        raise ImageError(str(err)) from None


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(array, affine)``: the 3D voxel array in file index order and its RAS affine; raises :class:`ImageError`.

    The whole file is decompressed, so truncated files are detected here (nibabel only fails on data access). The
    header's voxel count is checked first (NIfTI, NRRD, MetaImage): more than :data:`~meddiff3d.checks.MAX_VOXELS`,
    or more than the memory limit allows, is an error before anything is allocated.
    """
    path = Path(path)
    _require_exists(path)
    fmt = image_format(path)
    if fmt == "nifti":
        img = _nifti(path)
        _check_size(path, img.shape)
        try:
            array = np.asarray(img.dataobj)
        except Exception as err:
            raise ImageError(f"{path}: unreadable or truncated NIfTI data ({type(err).__name__}: {err})") from err
        affine = np.asarray(img.affine, np.float64)
    else:
        if fmt == "itk":
            _check_size(path, read_header(path).shape)
        image = read_sitk(path)
        try:
            array, affine = sitk_to_array(image)
        except ImageError as err:
            raise ImageError(f"{path}: {err}") from err
    shape = _squeeze_to_3d(path, array.shape)
    return array.reshape(shape), affine


def check_array(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, *, content: bool = False) -> None:
    """The checks of :func:`check_image` on voxels already read (e.g. by a conversion that goes on to use them):
    finite affine, finite voxels, and with ``content`` the content rule (:func:`check_image`)."""
    path = Path(path)
    if not np.isfinite(affine).all() or abs(np.linalg.det(np.asarray(affine)[:3, :3])) < 1e-12:
        raise ImageError(f"{path}: invalid affine (non-finite or singular):\n{affine}")
    if content and array.dtype.kind not in "biuf":
        kind = "complex" if array.dtype.kind == "c" else "non-numeric"
        raise ImageError(f"{path}: {kind} voxel values ({array.dtype}); a real-valued (integer or float) volume is "
                         f"required")
    if array.dtype.kind in "fc":
        bad = ~np.isfinite(array)
        if bad.any():
            n_nan = int(np.isnan(array).sum())
            raise ImageError(
                f"{path}: {int(bad.sum())} non-finite voxel values ({n_nan} NaN, {int(bad.sum()) - n_nan} Inf)"
            )
    if not content:
        return
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if not ((spacing >= low) & (spacing <= high)).all():
        shown = ", ".join(f"{s:.4g}" for s in spacing)
        raise ImageError(f"{path}: voxel spacing ({shown}) mm is outside the plausible range {low:g}-{high:g} mm "
                         f"(check the header's units and affine)")
    low_value, high_value = array.min(), array.max()
    if low_value == high_value:
        what = "all voxels are 0 (an empty volume)" if low_value == 0 else \
            f"all voxels have the value {low_value:g} (a constant volume)"
        raise ImageError(f"{path}: {what}; an image with content is required")


def check_image(path: str | os.PathLike, *, read_data: bool = True, content: bool = False) -> ImageInfo:
    """Validate one image: readable, 3D (see module doc), finite affine and - with ``read_data`` - finite voxels.

    Returns its :class:`ImageInfo`; raises :class:`ImageError` naming the file and the problem. ``read_data=False``
    checks the header only (fast, but a truncated file or NaN voxels go unnoticed).

    ``content=True`` (always reads the voxels) adds the checks of an image a model is to detect or segment in: real
    numbers (no complex or non-numeric voxels), not constant (an all-zero volume is rejected), voxel spacing within
    :data:`SPACING_RANGE_MM` (0.1-10 mm) on every axis. Training and synthetic readers leave it off; label maps
    (which may well be empty) never get it.
    """
    path = Path(path)
    if not (read_data or content):
        info = read_header(path)
        check_array(path, np.zeros(0, np.uint8), info.affine)
        return info
    array, affine = read_image(path)
    check_array(path, array, affine, content=content)
    return ImageInfo(path, array.shape, affine, image_format(path))


def grid_mismatch(reference: ImageInfo, other: ImageInfo, atol: float = GRID_ATOL_MM) -> str | None:
    """``None`` if both images share one voxel grid (shape equal, affines within ``atol`` mm), else what differs."""
    if tuple(reference.shape) != tuple(other.shape):
        return f"shape {tuple(other.shape)} differs from {tuple(reference.shape)} of {reference.path.name}"
    diff = float(np.max(np.abs(np.asarray(reference.affine) - np.asarray(other.affine))))
    if diff > atol:
        return (
            f"affine differs from that of {reference.path.name} by up to {diff:.4g} mm (tolerance {atol} mm); "
            f"resample both onto one grid"
        )
    return None


def canonical_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """A RAS affine with ``spacing`` whose volume is centred on the MNI-like box of the synthetic data."""
    affine = np.diag([*map(float, spacing), 1.0])
    centre_index = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(MNI_BOX_CENTRE_MM) - centre_index * np.asarray(spacing, dtype=np.float64)
    return affine
