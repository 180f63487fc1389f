"""How the four BraTS sequences of one case reach the server: three ways, one result (four 3D files, one grid).

1. **A case in the datastore** (the way documented for Slicer, docs/slicer.md): the request names ONE sequence
   image, e.g. ``BraTS2021_00000_flair``; its siblings are found beside it by the BraTS file naming
   ``<case>_{t1,t1ce,t2,flair}`` (2021) or ``<case>-{t1n,t1c,t2w,t2f}`` (2023), with any of ``.nii.gz``,
   ``.nii``, ``.nrrd``. The studies folder of ``meddiff3d label serve`` holds such files (flat), and Slicer's
   "Upload volume" of four volumes named ``<case>_t1`` ... ``<case>_flair`` puts them there too.
2. **Explicit ids**: ``params["sequences"]`` = ``{"t1": id, "t1ce": id, "t2": id, "flair": id}`` (or a list of four
   ids in that order), each a datastore image id (e.g. from four uploads with arbitrary names).
3. **One 4D volume**: the request's image has four channels (``x, y, z, 4``, in the order t1, t1ce, t2, flair, as
   Slicer saves a 4-component vector volume); it is split into four 3D files.

Anything else - three sequences, a missing sibling, a 4D image with another channel count, grids that differ, a
header claiming more than :data:`~meddiff3d.label.request.MAX_REQUEST_VOXELS` voxels (checked before any voxel is
read) - is an :class:`~meddiff3d.errors.InputError` naming what is wrong. Plain Python (no MONAI Label): unit-tested in the
core environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.data.brats import BRATS_MODALITIES
from meddiff3d.data.preprocess import BRATS_NAMING
from meddiff3d.errors import ImageError, InputError

__all__ = ["BRATS_MODALITIES", "split_sequence_name", "find_case_sequences", "resolve_sequences",
           "split_4d_volume", "split_paths", "sequences_datalist"]

_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
_NAME = re.compile(r"^(?P<case>.+?)(?P<sep>[_-])(?P<seq>t1ce|t1n|t1c|t2w|t2f|t1|t2|flair)"
                   r"(?P<ext>\.nii\.gz|\.nii|\.nrrd)$", re.IGNORECASE)


def split_sequence_name(path: str | os.PathLike) -> tuple[str, str, str, str] | None:
    """``(case, separator, naming convention, modality)`` of a BraTS sequence file name, or ``None``."""
    match = _NAME.match(Path(path).name)
    if match is None:
        return None
    seq = match["seq"].lower()
    convention = next(c for c, names in BRATS_NAMING.items() if seq in names)  # the two namings share no suffix
    return match["case"], match["sep"], convention, BRATS_NAMING[convention][seq]


def find_case_sequences(path: str | os.PathLike) -> list[Path]:
    """The four sequence files (t1, t1ce, t2, flair) of the case ``path`` (one of them) belongs to."""
    path = Path(path)
    parts = split_sequence_name(path)
    if parts is None:
        raise InputError(
            f"image {path.name} is a single 3D volume whose name does not say which BraTS case and sequence it is: "
            f"name the four files <case>_t1, <case>_t1ce, <case>_t2, <case>_flair (or <case>-t1n/-t1c/-t2w/-t2f), "
            f"send params 'sequences' with four image ids, or send one 4-channel volume")
    case, sep, convention, _ = parts
    by_modality = {modality: suffix for suffix, modality in BRATS_NAMING[convention].items() if modality != "seg"}
    found, missing = [], []
    for modality in BRATS_MODALITIES:
        candidates = [path.parent / f"{case}{sep}{by_modality[modality]}{ext}" for ext in _SUFFIXES]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            missing.append(f"{case}{sep}{by_modality[modality]}")
        else:
            found.append(hit)
    if missing:
        raise InputError(f"case {case!r} has {len(found)} of the 4 BraTS sequences beside {path.name}; missing: "
                         f"{', '.join(missing)} (.nii.gz/.nii/.nrrd). The segmentation model needs all four "
                         f"({', '.join(BRATS_MODALITIES)})")
    return found


def _ids_from_params(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(BRATS_MODALITIES))
        missing = [m for m in BRATS_MODALITIES if m not in value]
        if unknown or missing:
            raise InputError(f"params 'sequences' must map each of {', '.join(BRATS_MODALITIES)} to an image id; "
                             + (f"missing: {', '.join(missing)}" if missing else "")
                             + ("; " if missing and unknown else "")
                             + (f"unknown: {', '.join(unknown)}" if unknown else ""))
        ids = [value[m] for m in BRATS_MODALITIES]
    elif isinstance(value, (list, tuple)):
        if len(value) != len(BRATS_MODALITIES):
            raise InputError(f"params 'sequences' lists {len(value)} image ids; the segmentation model needs "
                             f"{len(BRATS_MODALITIES)} ({', '.join(BRATS_MODALITIES)}, in this order)")
        ids = list(value)
    else:
        raise InputError(f"params 'sequences' must be a mapping {{t1: id, t1ce: id, t2: id, flair: id}} or a list of "
                         f"four image ids, got {value!r}")
    if not all(isinstance(i, str) and i for i in ids):
        raise InputError(f"params 'sequences': every image id must be a non-empty string, got {ids!r}")
    return ids


def split_4d_volume(path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Four 3D NIfTI files (t1, t1ce, t2, flair) in ``out_dir`` from a 4-channel volume (channel last)."""
    import nibabel as nib

    from meddiff3d.data.images import image_format, read_sitk, sitk_geometry_to_ras_affine
    from meddiff3d.utils.io import save_nifti

    path = Path(path)
    if image_format(path) == "nifti":
        img = nib.load(str(path))
        try:
            array, affine = np.asarray(img.dataobj), np.asarray(img.affine, np.float64)
        except Exception as err:  # noqa: BLE001 - a truncated or corrupt upload
            raise ImageError(f"{path}: unreadable or truncated NIfTI data ({type(err).__name__}: {err})") from None
    else:  # NRRD: a vector image, or a 4D scalar image
        import SimpleITK as sitk

        image = read_sitk(path)
        array = sitk.GetArrayFromImage(image)
        if image.GetNumberOfComponentsPerPixel() > 1:  # (k, j, i, c)
            array = np.moveaxis(array, (0, 1, 2), (2, 1, 0))
        elif image.GetDimension() == 4:  # (t, k, j, i)
            array = np.transpose(array, (3, 2, 1, 0))
        dim = image.GetDimension()
        direction = np.asarray(image.GetDirection()).reshape(dim, dim)[:3, :3].ravel()
        affine = sitk_geometry_to_ras_affine(image.GetSpacing()[:3], image.GetOrigin()[:3], direction)
    while array.ndim > 4 and array.shape[3] == 1:  # NIfTI (x, y, z, 1, c)
        array = array[:, :, :, 0]
    if array.ndim != 4 or array.shape[3] != len(BRATS_MODALITIES):
        channels = array.shape[3] if array.ndim == 4 else 1
        raise InputError(f"image {path.name} has {channels} channel(s) (shape {tuple(array.shape)}); the segmentation "
                         f"model needs {len(BRATS_MODALITIES)} sequences ({', '.join(BRATS_MODALITIES)})")
    return [save_nifti(array[..., c].astype(np.float32), affine, path)
            for c, path in enumerate(split_paths(out_dir))]


def split_paths(out_dir: str | os.PathLike) -> list[Path]:
    """The four files :func:`split_4d_volume` writes (t1, t1ce, t2, flair)."""
    return [Path(out_dir) / f"case_{m}.nii.gz" for m in BRATS_MODALITIES]


def _grid_and_channels(path: Path) -> tuple[tuple[int, ...], int]:
    """``(spatial shape, number of channels)`` of an image file (1 channel for a 3D volume), from its header."""
    from meddiff3d.data.images import image_format

    try:
        if image_format(path) == "nifti":
            import nibabel as nib

            shape = nib.load(str(path)).shape
            grid, extra = tuple(shape[:3]), [s for s in shape[3:] if s != 1]
            return grid, int(np.prod(extra)) if extra else 1
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        size = reader.GetSize()
        return tuple(size[:3]), int(reader.GetNumberOfComponents()) * (int(size[3]) if len(size) > 3 else 1)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is an unreadable upload
        raise ImageError(f"{path}: unreadable image header ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[-1] if str(err).strip() else ''})") from None


def resolve_sequences(image: str | os.PathLike | None, params: Mapping[str, Any], work_dir: str | os.PathLike,
                      uri_of: Callable[[str], str]) -> list[Path]:
    """The four sequence files of a request, by the three ways of the module docstring.

    ``image`` is the request's image file (a datastore file or an upload), ``uri_of`` maps a datastore image id to its
    file (``""`` if unknown), ``work_dir`` receives the files split from a 4D volume.
    """
    from meddiff3d.checks import check_voxels
    from meddiff3d.data.images import grid_mismatch
    from meddiff3d.label.request import MAX_REQUEST_VOXELS, check_input_grid

    if params.get("sequences") not in (None, "", [], {}):
        files = []
        for image_id in _ids_from_params(params["sequences"]):
            uri = uri_of(image_id)
            if not uri or not Path(uri).is_file():
                raise InputError(f"params 'sequences': no image {image_id!r} in the datastore (upload it first)")
            files.append(Path(uri))
    else:
        if not image or not Path(image).exists():
            raise InputError("no input image: give an image id of the datastore, upload a file, or send params "
                             "'sequences'")
        image = Path(image)
        grid, channels = _grid_and_channels(image) if image.is_file() else ((), 1)
        if channels > 1:
            check_voxels(f"image {image}: grid", grid, MAX_REQUEST_VOXELS)  # before its voxels are read
            files = split_4d_volume(image, work_dir)
        else:
            files = find_case_sequences(image)
    infos = [check_input_grid(f, f"sequence {m}") for m, f in zip(BRATS_MODALITIES, files)]
    for modality, info in zip(BRATS_MODALITIES[1:], infos[1:]):
        problem = grid_mismatch(infos[0], info)
        if problem:
            raise InputError(f"sequence {modality} ({info.path.name}): {problem}")
    return files


def sequences_datalist(files: Sequence[Path], case_id: str, path: str | os.PathLike) -> Path:
    """A one-item datalist (section ``test``) for the four sequence files: the segmentation pipeline's input."""
    from meddiff3d.utils.io import save_json

    return save_json({"name": "meddiff3d-label-request", "modalities": list(BRATS_MODALITIES),
                      "test": [{"id": case_id, "image": [str(Path(f).absolute()) for f in files]}]}, path)
