"""T1 cohorts -> the meddiff3d layout: ``meddiff3d datalist t1 SRC --out DIR`` (see :mod:`meddiff3d.data.preprocess`).

Each T1 volume (NIfTI/NRRD file, or a DICOM series folder) is resampled to a 1 mm RAS grid of 160x224x160 voxels
centred on the head's centre of mass (optionally N4 bias corrected first, SimpleITK) and written as
``DIR/images/<id>_t1.nii.gz``; covariates from a CSV are scaled to [0, 1] and their scaling recorded in
``DIR/datalist.json``.

Every input is read whole (:func:`read_t1`: a truncated file is an error naming it) and checked like an image to
detect in (:func:`~meddiff3d.data.images.check_image` ``content``: not constant, real voxels, spacing 0.1-10 mm);
its size, and that of its resampled grid, are checked against :data:`~meddiff3d.checks.MAX_VOXELS` and the memory
limit before it is read. Inputs that cannot be used (unreadable, broken symbolic links, symlink loops, unsafe
names) are all reported in one error. The conversion is all-or-nothing: the dataset is written into a temporary
folder beside ``DIR`` and renamed to ``DIR`` at the end (``DIR`` must be new or empty), so a failure leaves nothing.
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

from meddiff3d.checks import (check_int, check_memory, check_number, check_sizes, check_voxels, raise_problems,
                              safe_name)
from meddiff3d.data.datalist import split_ids, write_checked_datalist
from meddiff3d.data.folders import dicom_series_folder, scan_folder, series_ids, staged_folder
from meddiff3d.errors import InputError

log = logging.getLogger(__name__)

T1_SHAPE = (160, 224, 160)
#: memory of one conversion per voxel of the input plus its resampled grid: about four float32 copies
T1_BYTES_PER_VOXEL = 16


# -------------------------------------------------------------------------------------------------------- T1 cohort
def find_t1_inputs(src: str | os.PathLike) -> dict[str, Path]:
    """``{id: path}``: image files directly in ``src`` (id = name without suffix) and DICOM series sub-folders, or
    ``src`` itself when it is one DICOM series (id = its name; :func:`~meddiff3d.data.folders.dicom_series_folder`,
    which refuses a folder mixing series, or slices and image files).

    Broken symbolic links, symlink loops, unreadable entries, ids that are no safe file name and two inputs for one
    id are reported together in one :class:`InputError`; a sub-folder without a DICOM series is skipped with a warning.
    """
    from meddiff3d.data.images import ITK_SUFFIXES, NIFTI_SUFFIXES

    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: T1 cohort folder not found")
    if dicom_series_folder(src):
        return {safe_name(f"T1 case id (from {src})", src.name): src}
    problems: list[str] = []
    found: dict[str, Path] = {}
    for entry, is_folder in scan_folder(src, problems):
        name = entry.name
        if not is_folder and name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
            case = re.sub(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$", "", name, flags=re.IGNORECASE)
        elif is_folder and not os.access(entry, os.R_OK | os.X_OK):
            problems.append(f"{entry}: unreadable folder (permission denied)")
            continue
        elif is_folder and series_ids(entry):
            case = name
        else:
            if is_folder:
                log.warning("%s: no DICOM series in this folder; skipped", entry)
            continue
        try:
            case = safe_name(f"T1 case id (from {entry})", case)
        except InputError as err:
            problems.append(str(err))
            continue
        if case in found:
            problems.append(f"two inputs for id {case}: {found[case].name} and {name}")
            continue
        found[case] = entry
    raise_problems(f"T1 cohort {src}", problems)
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


def _check_t1_size(path: Path, shape: Sequence[int], input_spacing: Sequence[float], spacing: Sequence[float]) -> None:
    """The input's voxels, those of its grid resampled to ``spacing``, and the memory of both within the caps."""
    voxels = check_voxels(f"T1 {path}: shape", shape)
    resampled = [max(1, math.ceil(n * s_in / s_out)) for n, s_in, s_out in zip(shape, input_spacing, spacing)]
    more = check_voxels(f"T1 {path} resampled to {[float(s) for s in spacing]} mm: shape", resampled)
    check_memory(f"converting T1 {path}", T1_BYTES_PER_VOXEL * (voxels + more))


def read_t1(path: str | os.PathLike, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """``(array, RAS affine)`` of one T1 input (file or DICOM folder), every voxel read and checked (see the module
    doc); its size is checked from the header first (a DICOM series: once read)."""
    from meddiff3d.data.images import check_array, image_format, read_header, read_image

    path = Path(path)
    dicom = image_format(path) == "dicom"
    if not dicom:
        info = read_header(path)
        _check_t1_size(path, info.shape, info.spacing, spacing)
    array, affine = read_image(path)
    check_array(path, array, affine, content=True)
    if dicom:
        _check_t1_size(path, array.shape, np.linalg.norm(affine[:3, :3], axis=0), spacing)
    return array, affine


def preprocess_t1(path, out_path, *, spacing=(1.0, 1.0, 1.0), shape=T1_SHAPE, n4: bool = False,
                  n4_shrink: int = 4, n4_iterations: Sequence[int] = (50, 50, 30), volume=None,
                  mask_path=None) -> Path:
    """One T1 (file or DICOM folder) -> RAS, ``spacing``, ``shape`` around the head centre -> NIfTI (atomic).

    ``volume``: its ``(array, affine)`` if already read by :func:`read_t1` (default: read here). ``mask_path``:
    skull-strip on the output grid (:func:`meddiff3d.data.brain_mask.brain_mask`; zero outside the brain) and write
    the mask there (uint8). Without it, an output that is not skull-stripped is logged as a warning.
    """
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from meddiff3d.data.images import array_to_sitk, sitk_to_array
    from meddiff3d.utils.io import save_nifti

    array, affine = volume if volume is not None else read_t1(path, spacing)
    array = np.asarray(array, dtype=np.float32)
    if n4:
        array, affine = sitk_to_array(n4_bias_correct(array_to_sitk(array, affine), shrink_factor=n4_shrink,
                                                      iterations=n4_iterations))
    vol = MetaTensor(torch.as_tensor(array[None].astype(np.float32)), affine=torch.as_tensor(affine))
    vol = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(vol)
    vol = Spacing(pixdim=tuple(spacing), mode="bilinear")(vol)
    vol = crop_or_pad_around(vol, head_center(vol), shape)
    array, affine = vol[0].numpy(), vol.affine.numpy()
    if mask_path is not None:
        from meddiff3d.data.brain_mask import brain_mask

        mask = brain_mask(array, affine)
        save_nifti(mask, affine, mask_path, dtype=np.uint8)
        array = array * mask
    else:
        from meddiff3d.data.brain_mask import MAX_OUTSIDE_ML, tissue_outside_brain_ml

        outside = tissue_outside_brain_ml(array, affine)
        if outside > MAX_OUTSIDE_ML:
            log.warning("%s: %.0f mL of tissue outside the brain: not skull-stripped, which the models expect "
                        "(convert with --skull-strip)", path, outside)
    return save_nifti(array, affine, out_path)


def read_covariates_csv(
    path: str | os.PathLike, ids: Sequence[str], ranges: Mapping[str, Mapping] | None = None
) -> tuple[dict, dict[str, dict]]:
    """``(scaling block, {id: {name: value in [0, 1]}})`` from a CSV with an ``id`` column; see the module doc.

    ``ranges`` fixes the scaling of the named columns (``{"age": {"min": 40, "max": 90}, "sex": {"categories":
    ["F", "M"]}}``, e.g. the ``covariates`` block of the datalist a model was trained on) instead of the cohort's own
    min/max, so a new cohort is scaled as the model expects; a value outside a fixed range is an error.
    """
    ranges = _check_ranges(ranges)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"covariates CSV {path}: file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # utf-8-sig: spreadsheets write a byte-order mark
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"covariates CSV {path}: cannot read it as UTF-8 CSV ({err})") from None
    if not rows or "id" not in rows[0]:
        raise InputError(f"covariates CSV {path}: needs a header with an 'id' column and at least one row")
    by_id = {}
    for number, row in enumerate(rows, start=2):
        key = (row.get("id") or "").strip()
        if key in by_id:
            raise InputError(f"covariates CSV {path}: id {key!r} appears twice (line {number})")
        by_id[key] = row
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


def _check_ranges(ranges: Mapping[str, Mapping] | None) -> dict:
    """Fixed covariate ranges: ``{name: {"min": number, "max": number}}`` or ``{name: {"categories": [...]}}``."""
    ranges = dict(ranges or {})
    for name, fixed in ranges.items():
        if not isinstance(fixed, Mapping):
            raise InputError(f"covariate ranges: {name!r} must be {{'min', 'max'}} or {{'categories'}}, got {fixed!r}")
        if "categories" in fixed:
            if not isinstance(fixed["categories"], list) or not fixed["categories"]:
                raise InputError(f"covariate ranges: {name!r} categories must be a non-empty list")
            continue
        for key in ("min", "max"):
            if key in fixed:
                check_number(f"covariate ranges: {name!r} {key}", fixed[key])
        if "min" in fixed and "max" in fixed and fixed["min"] > fixed["max"]:
            raise InputError(f"covariate ranges: {name!r} min {fixed['min']} exceeds max {fixed['max']}")
    return ranges


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
    skull_strip: bool = False,
) -> Path:
    """Convert a T1 cohort folder to ``out_dir/images/<id>_t1.nii.gz`` + ``out_dir/datalist.json``; returns the latter.

    The arguments, the output folder (new or empty, writable), the inputs (:func:`find_t1_inputs`) and the
    covariates CSV are checked before any image is read. Every input is read whole (:func:`read_t1`); after the
    first unusable one the rest are still read, to report them all, but nothing more is converted. All is written
    into a temporary folder renamed to ``out_dir`` at the end: a failure leaves nothing behind.
    """
    from meddiff3d.data.images import SPACING_RANGE_MM

    spacing = [check_number("datalist t1 --spacing (mm)", v, *SPACING_RANGE_MM) for v in spacing]
    if len(spacing) != 3:
        raise InputError(f"datalist t1 --spacing must be 3 numbers, got {spacing}")
    shape = check_sizes("datalist t1 --shape", list(shape))
    check_voxels("datalist t1 --shape", shape)
    n4_shrink = check_int("datalist t1 --n4-shrink", n4_shrink, 1)
    out_dir = Path(out_dir).expanduser().absolute()
    with staged_folder(out_dir, "datalist t1 --out") as staging:  # checks out_dir first: new or empty, writable
        inputs = find_t1_inputs(src)
        scaling, covariates = ({}, {})
        if covariates_csv is not None:
            scaling, covariates = read_covariates_csv(covariates_csv, list(inputs), covariate_ranges)
        split = split_ids(list(inputs), fractions, seed)
        problems: list[str] = []
        written, masks = {}, {}
        for case, path in inputs.items():
            try:
                volume = read_t1(path, spacing)
            except InputError as err:
                problems.append(str(err))
                continue
            if problems:  # keep reading, to report every unusable input, but convert no more
                continue
            mask = staging / "masks" / f"{case}_brain.nii.gz" if skull_strip else None
            written[case] = preprocess_t1(path, staging / "images" / f"{case}_t1.nii.gz", spacing=spacing,
                                          shape=shape, n4=n4, n4_shrink=n4_shrink, volume=volume, mask_path=mask)
            if mask is not None:
                masks[case] = mask
            log.info("%s: converted (%d of %d)", path, len(written), len(inputs))
        raise_problems(f"T1 cohort {src}: nothing written", problems)

        def item(case):
            entry = {"id": case, "image": str(written[case]), "source": str(Path(inputs[case]).absolute())}
            if case in covariates:
                entry["covariates"] = covariates[case]
            if case in masks:
                entry["brain_mask"] = str(masks[case])  # made relative to the datalist's folder on writing
            return entry

        sections = {name: [item(c) for c in ids] for name, ids in split.items()}
        meta = {
            "name": f"t1:{Path(src).name}",
            "description": f"T1 cohort {Path(src).absolute()}: RAS, {list(spacing)} mm, {list(shape)} voxels around "
                           f"the head centre of mass, N4 {'on' if n4 else 'off'}, skull stripping "
                           f"{'on (masks/)' if skull_strip else 'off'}",
            "modalities": ["t1"],
            "skull_stripped": bool(skull_strip),
            "covariates": scaling,
        }
        write_checked_datalist(staging / "datalist.json", sections, **meta)
    return out_dir / "datalist.json"
