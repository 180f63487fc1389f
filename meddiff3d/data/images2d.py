"""Reading and checking 2D images: PNG and JPEG (8- or 16-bit), single-frame DICOM (CR/DX radiographs, one MR or CT
slice), NRRD and MetaImage by SimpleITK; 2D NIfTI by nibabel (SimpleITK's NIfTI reader turns NaN into 0).

A 2D image is a float32 array ``(rows, columns)`` as displayed, row 0 at the top (SimpleITK's and PIL's order; for
a DICOM file, its pixel data order; a NIfTI of shape ``(X, Y)`` gives rows ``Y`` x columns ``X`` in file order, its
affine's orientation not applied), with its pixel spacing in mm ``(row spacing, column spacing)``: the file's for
DICOM, NIfTI, NRRD and MetaImage, 1 mm for PNG and JPEG (which store none). Stored values are kept (DICOM's rescale slope and intercept
applied); GDCM reads a ``MONOCHROME1`` DICOM (a radiograph whose low values display white) inverted, so that every
image has bright = high.

A colour file is refused unless its channels are equal (a grayscale image saved as RGB or RGBA: the first channel
is kept); so are a multi-frame DICOM, a 3D volume with more than one slice, a constant image and non-finite values.
Every error is an :class:`~meddiff3d.errors.ImageError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddiff3d.checks import check_voxels
from meddiff3d.data.images import _nifti
from meddiff3d.errors import ImageError

__all__ = ["Image2D", "IMAGE_2D_SUFFIXES", "read_image_2d", "image_2d_size", "is_image_2d_file", "resample"]

IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")
_NO_SPACING = (".png", ".jpg", ".jpeg")
#: the DICOM tag Number of Frames
_FRAMES = "0028|0008"


@dataclass(frozen=True)
class Image2D:
    """A 2D image: ``array`` float32 ``(rows, columns)``, ``spacing`` mm ``(rows, columns)``, the ``path`` read, its
    ``format`` (``"png"``, ``"jpeg"``, ``"dicom"``, ``"nifti"`` or ``"itk"``) and the ``dtype`` its pixels are
    stored in (``"uint8"``, ``"uint16"``, ``"float32"``, ...; :meth:`full_scale` gives an unsigned type's maximum)."""

    array: np.ndarray
    spacing: tuple[float, float]
    path: Path
    format: str
    dtype: str = "float32"

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    def full_scale(self) -> float:
        """The largest value the stored type holds (255 for 8-bit, 65535 for 16-bit files); else the image's max."""
        kind = np.dtype(self.dtype)
        return float(np.iinfo(kind).max) if kind.kind == "u" else float(self.array.max())


def resample(image: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(N, C, h, w)`` images resampled to ``shape`` (bilinear, antialiased when shrinking: 1024 -> 128 averages
    8 x 8 pixels); unchanged when already of that size."""
    if tuple(image.shape[2:]) == tuple(shape):
        return image
    return F.interpolate(image, size=tuple(shape), mode="bilinear", antialias=True, align_corners=False)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def is_image_2d_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file of a 2D image format this module reads (by its suffix)."""
    return _suffix(Path(path)) in IMAGE_2D_SUFFIXES


def _format(suffix: str) -> str:
    return {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".dcm": "dicom", ".nii": "nifti",
            ".nii.gz": "nifti"}.get(suffix, "itk")


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in IMAGE_2D_SUFFIXES:
        raise ImageError(f"{path}: unsupported 2D image format {suffix or '(no suffix)'!r}; supported: "
                         f"{', '.join(IMAGE_2D_SUFFIXES)}")
    if not path.is_file():
        raise ImageError(f"{path}: file not found")
    return path


def _reader(path: Path):
    """A SimpleITK reader of ``path`` with its header read and checked: one 2D image (or a single slice)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if _suffix(path) == ".dcm":
        reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except Exception as err:  # SimpleITK raises RuntimeError with a multi-line ITK message
        raise ImageError(f"{path}: unreadable image ({str(err).strip().splitlines()[-1]})") from err
    dims, size = reader.GetDimension(), reader.GetSize()
    if dims > 2 and any(s > 1 for s in size[2:]):
        frames = reader.GetMetaData(_FRAMES).strip() if reader.HasMetaDataKey(_FRAMES) else None
        what = f"a multi-frame DICOM ({frames} frames)" if frames else f"a {dims}D image of size {list(size)}"
        raise ImageError(f"{path}: is {what}; a single 2D image is expected")
    check_voxels(f"{path}: image", size)
    return reader


def _nifti_shape(path: Path, img) -> tuple[int, int]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 2:
        raise ImageError(f"{path}: is a {len(shape)}D image of size {list(img.shape)}; a single 2D image is expected")
    check_voxels(f"{path}: image", shape)
    return shape


def image_2d_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(rows, columns)`` of the 2D image in ``path`` from its header only (fast; no pixel checks)."""
    path = _checked_path(path)
    if _format(_suffix(path)) == "nifti":
        return _nifti_shape(path, _nifti(path))[::-1]
    return tuple(int(s) for s in _reader(path).GetSize()[:2])[::-1]


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """A 2D NIfTI (or ``(X, Y, 1)``) by nibabel, as rows ``Y`` x columns ``X`` (ITK's order)."""
    img = _nifti(path)
    shape = _nifti_shape(path, img)
    try:
        data = np.asarray(img.dataobj).reshape(shape)
    except Exception as err:
        raise ImageError(f"{path}: unreadable or truncated NIfTI data ({type(err).__name__}: {err})") from err
    zooms = img.header.get_zooms()
    return data.T, (float(zooms[1]), float(zooms[0]))


def read_image_2d(path: str | os.PathLike) -> Image2D:
    """The 2D image in ``path`` (see the module docstring), checked."""
    import SimpleITK as sitk

    path = _checked_path(path)
    suffix = _suffix(path)
    if _format(suffix) == "nifti":
        array, spacing = _read_nifti(path)
    else:
        try:
            image = _reader(path).Execute()
        except ImageError:
            raise
        except Exception as err:
            raise ImageError(f"{path}: unreadable image ({str(err).strip().splitlines()[-1]})") from err
        array = sitk.GetArrayFromImage(image)  # (rows, columns[, channels]), 3D files (1, rows, columns[, ...])
        spacing = tuple(float(s) for s in image.GetSpacing()[:2])[::-1]
        components = image.GetNumberOfComponentsPerPixel()
        if image.GetDimension() > 2:
            array = array.reshape(array.shape[-2:] if components == 1 else array.shape[-3:])
        if components > 1:
            channels = array.shape[-1]
            if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(channels, 3))):
                raise ImageError(f"{path}: is a colour image ({channels} channels that differ); a grayscale image "
                                 f"is expected")
            array = array[..., 0]
    if np.iscomplexobj(array):
        raise ImageError(f"{path}: has complex pixel values; a real-valued image is expected")
    stored = str(np.asarray(array).dtype)
    array = np.asarray(array, dtype=np.float32)
    if min(array.shape) < 2:
        raise ImageError(f"{path}: image of shape {list(array.shape)} is not a 2D image of at least 2x2 pixels")
    if not np.isfinite(array).all():
        raise ImageError(f"{path}: has {int((~np.isfinite(array)).sum())} non-finite (NaN or infinite) pixels")
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise ImageError(f"{path}: is constant (every pixel {low:g}): no image content")
    if suffix in _NO_SPACING:
        spacing = (1.0, 1.0)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ImageError(f"{path}: pixel spacing {list(spacing)} is not positive and finite")
    return Image2D(np.ascontiguousarray(array), spacing, path, _format(suffix), stored)
