"""T1 cohorts -> the meddiff3d layout: ``meddiff3d datalist t1 SRC --out DIR`` (see :mod:`meddiff3d.data.preprocess`).

Each T1 volume (NIfTI/NRRD file, or a DICOM series folder) is resampled to a 1 mm RAS grid of 160x224x160 voxels
centred on the head's centre of mass (optionally N4 bias corrected first, SimpleITK) and written as
``DIR/images/<id>_t1.nii.gz``; covariates from a CSV are scaled to [0, 1] and their scaling recorded in
``DIR/datalist.json``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from meddiff3d.data.datalist import split_ids, write_checked_datalist
from meddiff3d.errors import InputError

log = logging.getLogger(__name__)

T1_SHAPE = (160, 224, 160)


# -------------------------------------------------------------------------------------------------------- T1 cohort
def find_t1_inputs(src: str | os.PathLike) -> dict[str, Path]:
    """``{id: path}``: image files directly in ``src`` (id = name without suffix) and DICOM series sub-folders."""
    import SimpleITK as sitk

    from meddiff3d.data.images import ITK_SUFFIXES, NIFTI_SUFFIXES

    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: T1 cohort folder not found")
    found: dict[str, Path] = {}
    for entry in sorted(src.iterdir()):
        name = entry.name
        if entry.is_file() and name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
            case = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", name, flags=re.IGNORECASE)
        elif entry.is_dir() and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(entry)):
            case = name
        else:
            continue
        if case in found:
            raise InputError(f"{src}: two inputs for id {case}: {found[case].name} and {name}")
        found[case] = entry
    if not found:
        raise InputError(f"{src}: no NIfTI/NRRD files or DICOM series folders found")
    return found


def n4_bias_correct(image, shrink_factor: int = 4, iterations: Sequence[int] = (50, 50, 30), mask=None):
    """N4 bias-field correction (SimpleITK) fitted on a ``shrink_factor``-downsampled copy, applied at full size.

    ``mask`` defaults to an Otsu foreground mask. Returns a float32 SimpleITK image on the input grid.
    """
    import SimpleITK as sitk

    image = sitk.Cast(image, sitk.sitkFloat32)
    if mask is None:
        mask = sitk.OtsuThreshold(image, 0, 1, 200)
    shrink = [max(1, int(shrink_factor))] * image.GetDimension()
    small, small_mask = sitk.Shrink(image, shrink), sitk.Shrink(mask, shrink)
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([int(i) for i in iterations])
    corrector.Execute(small, small_mask)
    log_bias = corrector.GetLogBiasFieldAsImage(image)
    return sitk.Cast(image / sitk.Exp(log_bias), sitk.sitkFloat32)


def crop_or_pad_around(volume, center, shape):
    """Crop/zero-pad a channel-first MetaTensor to ``shape`` with ``center`` (voxel coordinates) in the middle.

    Uses MONAI ``BorderPad`` + ``SpatialCrop``, so the affine follows.
    """
    from monai.transforms import BorderPad, SpatialCrop

    size = np.asarray(volume.shape[1:])
    start = np.round(np.asarray(center, dtype=np.float64) - np.asarray(shape) / 2.0).astype(int)
    end = start + np.asarray(shape)
    before, after = np.maximum(0, -start), np.maximum(0, end - size)
    if before.any() or after.any():
        volume = BorderPad(spatial_border=[int(v) for pair in zip(before, after) for v in pair])(volume)
    start = start + before
    return SpatialCrop(roi_start=start.tolist(), roi_end=(start + np.asarray(shape)).tolist())(volume)


def head_center(volume) -> np.ndarray:
    """Voxel centre of mass of the head: voxels above 10% of the 99th intensity percentile."""
    from scipy import ndimage

    array = np.asarray(volume[0] if volume.ndim == 4 else volume, dtype=np.float32)
    mask = array > 0.1 * np.percentile(array, 99)
    if not mask.any():
        return (np.asarray(array.shape) - 1) / 2.0
    return np.asarray(ndimage.center_of_mass(mask))


def preprocess_t1(path, out_path, *, spacing=(1.0, 1.0, 1.0), shape=T1_SHAPE, n4: bool = False,
                  n4_shrink: int = 4, n4_iterations: Sequence[int] = (50, 50, 30)) -> Path:
    """One T1 (file or DICOM folder) -> RAS, ``spacing``, ``shape`` around the head centre -> NIfTI (atomic)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from meddiff3d.data.images import read_sitk, sitk_to_array
    from meddiff3d.utils.io import save_nifti

    image = read_sitk(path)
    if n4:
        image = n4_bias_correct(image, shrink_factor=n4_shrink, iterations=n4_iterations)
    try:
        array, affine = sitk_to_array(image)
    except InputError as err:
        raise InputError(f"{path}: {err}") from err
    if array.ndim != 3:
        raise InputError(f"{path}: expected one 3D T1 volume, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{path}: non-finite voxel values")
    vol = MetaTensor(torch.as_tensor(array[None].astype(np.float32)), affine=torch.as_tensor(affine))
    vol = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(vol)
    vol = Spacing(pixdim=tuple(spacing), mode="bilinear")(vol)
    vol = crop_or_pad_around(vol, head_center(vol), shape)
    return save_nifti(vol[0].numpy(), vol.affine.numpy(), out_path)


def read_covariates_csv(
    path: str | os.PathLike, ids: Sequence[str], ranges: Mapping[str, Mapping] | None = None
) -> tuple[dict, dict[str, dict]]:
    """``(scaling block, {id: {name: value in [0, 1]}})`` from a CSV with an ``id`` column; see the module doc.

    ``ranges`` fixes the scaling of the named columns (``{"age": {"min": 40, "max": 90}, "sex": {"categories":
    ["F", "M"]}}``, e.g. the ``covariates`` block of the datalist a model was trained on) instead of the cohort's own
    min/max, so a new cohort is scaled as the model expects; a value outside a fixed range is an error.
    """
    ranges = dict(ranges or {})
    path = Path(path)
    if not path.is_file():
        raise InputError(f"covariates CSV {path}: file not found")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "id" not in rows[0]:
        raise InputError(f"covariates CSV {path}: needs a header with an 'id' column and at least one row")
    by_id = {row["id"].strip(): row for row in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise InputError(f"covariates CSV {path}: no row for id(s) {missing[:10]}")
    names = [c for c in rows[0] if c != "id"]
    scaling, values = {}, {i: {} for i in ids}
    for name in names:
        raw = {i: (by_id[i].get(name) or "").strip() for i in ids}
        empty = [i for i, v in raw.items() if v == ""]
        if empty:
            raise InputError(f"covariates CSV {path}: column {name!r} is empty for id(s) {empty[:10]}")
        try:
            numbers = {i: float(v) for i, v in raw.items()}
        except ValueError:
            numbers = None
        fixed = ranges.get(name) or {}
        if "categories" in fixed:
            numbers = None
        if numbers is not None and all(math.isfinite(v) for v in numbers.values()):
            lo, hi = fixed.get("min", min(numbers.values())), fixed.get("max", max(numbers.values()))
            outside = [i for i, v in numbers.items() if not lo <= v <= hi]
            if outside:
                raise InputError(f"covariates CSV {path}: column {name!r} has values outside the fixed range "
                                 f"[{lo}, {hi}] for id(s) {outside[:10]}")
            scaling[name] = {**fixed, "min": lo, "max": hi}
            for i, v in numbers.items():
                values[i][name] = (v - lo) / (hi - lo) if hi > lo else 0.0
        else:
            categories = list(fixed.get("categories") or sorted(set(raw.values())))
            unknown = sorted(set(raw.values()) - set(categories))
            if unknown:
                raise InputError(f"covariates CSV {path}: column {name!r} has values {unknown} outside the categories "
                                 f"{categories}")
            scaling[name] = {"categories": categories}
            for i, v in raw.items():
                values[i][name] = categories.index(v) / max(1, len(categories) - 1)
    return scaling, values


def t1_cohort_to_dataset(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    covariates_csv: str | os.PathLike | None = None,
    covariate_ranges: Mapping[str, Mapping] | None = None,
    n4: bool = False,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = T1_SHAPE,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    n4_shrink: int = 4,
) -> Path:
    """Convert a T1 cohort folder to ``out_dir/images/<id>_t1.nii.gz`` + ``out_dir/datalist.json``; returns the latter.

    The covariates CSV is checked before any image is written.
    """
    inputs = find_t1_inputs(src)
    out_dir = Path(out_dir)
    scaling, covariates = ({}, {})
    if covariates_csv is not None:
        scaling, covariates = read_covariates_csv(covariates_csv, list(inputs), covariate_ranges)
    written = {}
    for case, path in inputs.items():
        target = out_dir / "images" / f"{case}_t1.nii.gz"
        written[case] = preprocess_t1(path, target, spacing=spacing, shape=shape, n4=n4, n4_shrink=n4_shrink)
        log.info("%s -> %s", path, target)

    def item(case):
        entry = {"id": case, "image": str(written[case]), "source": str(Path(inputs[case]).absolute())}
        if case in covariates:
            entry["covariates"] = covariates[case]
        return entry

    sections = {name: [item(c) for c in ids] for name, ids in split_ids(list(inputs), fractions, seed).items()}
    meta = {
        "name": f"t1:{Path(src).name}",
        "description": f"T1 cohort {Path(src).absolute()}: RAS, {list(spacing)} mm, {list(shape)} voxels around the "
                       f"head centre of mass, N4 {'on' if n4 else 'off'}",
        "modalities": ["t1"],
        "covariates": scaling,
    }
    return write_checked_datalist(out_dir / "datalist.json", sections, **meta)
