"""Real data -> the meddiff3d layout: BraTS folders and T1 cohorts to datalists, and the ``datalist`` CLI.

``meddiff3d datalist brats SRC --out DATALIST.json``
    Index a BraTS training folder in place (no copies). Both namings are detected, per case folder::

        BraTS 2021: BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz      labels 1/2/4
        BraTS 2023: BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz  labels 1/2/3

    Modalities are always ``[t1, t1ce, t2, flair]`` (2023: t1n, t1c, t2w, t2f); ``label_convention`` records which
    label values the ``seg`` files use. Cases are split into training/validation/test by ``--fractions`` with
    ``--seed``. A case missing a sequence is an error, or skipped with a warning under ``--skip-incomplete``.

``meddiff3d datalist t1 SRC --out DIR [--covariates CSV [--covariate-ranges JSON]] [--n4]``
    Convert a T1 cohort (NIfTI/NRRD files, or one folder per DICOM series, in SRC) to ``DIR/images/<id>_t1.nii.gz``
    on a 1 mm RAS grid of 160x224x160 voxels centred on the head's centre of mass (optionally N4 bias corrected
    first) and ``DIR/datalist.json``. Covariates from the CSV (``id`` column + one column per covariate) are scaled
    to [0, 1]: numeric columns by ``(raw - min) / (max - min)`` over the cohort, text columns (e.g. sex ``F``/``M``)
    by ``index / (n_categories - 1)`` in sorted category order; the scaling is recorded in the datalist.

``meddiff3d datalist validate DATALIST [--section S]``
    Run :func:`~meddiff3d.data.datalist.load_datalist` on each section and print a summary.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from meddiff3d.data.brats import BRATS_MODALITIES
from meddiff3d.data.datalist import SECTIONS, load_datalist, read_datalist, write_datalist
from meddiff3d.errors import DatalistError, InputError

log = logging.getLogger(__name__)

#: file suffix -> modality (or "seg"), per naming convention
BRATS_NAMING = {
    "brats2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "brats2023": {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", "seg": "seg"},
}
BRATS_LABEL_NAMES = {
    "brats2021": {"0": "background", "1": "NCR", "2": "ED", "4": "ET"},
    "brats2023": {"0": "background", "1": "NCR", "2": "SNFH", "3": "ET"},
}
_BRATS_FILE = re.compile(r"^(?P<case>.+?)(?P<sep>[_-])(?P<seq>t1ce|t1n|t1c|t2w|t2f|t1|t2|flair|seg)\.nii(\.gz)?$")
T1_SHAPE = (160, 224, 160)


# ---------------------------------------------------------------------------------------------------------- splits
def split_ids(ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list]:
    """Shuffle sorted ``ids`` with ``seed`` and cut them into training/validation/test by ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    order = list(np.random.default_rng(seed).permutation(sorted(ids)))
    n_train = int(round(fractions[0] * len(order)))
    n_val = min(int(round(fractions[1] * len(order))), len(order) - n_train)
    parts = {"training": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: [str(i) for i in part] for name, part in parts.items() if part}


def _write_checked(out: Path, sections: Mapping[str, list], **meta) -> Path:
    """Write the datalist, validate every section (headers only); on a problem remove the file and re-raise."""
    write_datalist(out, sections, **meta)
    try:
        for name in sections:
            load_datalist(out, name, check_images="header")
    except DatalistError:
        out.unlink(missing_ok=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------------------- BraTS
def find_brats_cases(src: str | os.PathLike, skip_incomplete: bool = False) -> tuple[str, dict[str, dict]]:
    """``(label_convention, {case_id: {"t1": path, ..., "seg": path (if present)}})`` for a BraTS folder."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: BraTS folder not found")
    cases: dict[str, dict[str, Path]] = {}
    conventions: dict[str, set] = {}
    for file in sorted(src.rglob("*.nii*")):
        match = _BRATS_FILE.match(file.name)
        if not match:
            continue
        case, seq = match["case"], match["seq"]
        if match["sep"] == "_" and seq in BRATS_NAMING["brats2021"]:
            convention = "brats2021"
        elif match["sep"] == "-" and seq in BRATS_NAMING["brats2023"]:
            convention = "brats2023"
        else:
            continue
        conventions.setdefault(convention, set()).add(case)
        cases.setdefault(case, {})[BRATS_NAMING[convention][seq]] = file
    if not cases:
        raise InputError(
            f"{src}: no BraTS files found (expected CASE/CASE_{{t1,t1ce,t2,flair,seg}}.nii.gz (2021) or "
            f"CASE/CASE-{{t1n,t1c,t2w,t2f,seg}}.nii.gz (2023))"
        )
    if len(conventions) > 1:
        raise InputError(f"{src}: mixes BraTS 2021 and 2023 file naming; convert each release separately")
    convention = next(iter(conventions))
    with_seg = any("seg" in files for files in cases.values())
    wanted = BRATS_MODALITIES + (("seg",) if with_seg else ())
    complete = {}
    for case, files in sorted(cases.items()):
        missing = [m for m in wanted if m not in files]
        if missing:
            naming = {v: k for k, v in BRATS_NAMING[convention].items()}
            message = f"{src}: case {case} is missing {', '.join(naming[m] for m in missing)}"
            if not skip_incomplete:
                raise InputError(message + " (use --skip-incomplete to leave such cases out)")
            log.warning("%s; skipped", message)
            continue
        complete[case] = files
    if not complete:
        raise InputError(f"{src}: no complete BraTS case")
    return convention, complete


def brats_to_datalist(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    skip_incomplete: bool = False,
) -> Path:
    """Index a BraTS 2021 or 2023 folder as a datalist at ``out`` (images stay where they are); returns ``out``."""
    convention, cases = find_brats_cases(src, skip_incomplete=skip_incomplete)
    split = split_ids(list(cases), fractions, seed)

    def item(case):
        files = cases[case]
        entry = {"id": case, "image": [str(Path(files[m]).absolute()) for m in BRATS_MODALITIES]}
        if "seg" in files:
            entry["label"] = str(Path(files["seg"]).absolute())
        return entry

    sections = {name: [item(c) for c in ids] for name, ids in split.items()}
    meta = {
        "name": f"{convention}:{Path(src).name}",
        "description": f"BraTS folder {Path(src).absolute()} indexed by meddiff3d (seed {seed}, fractions "
                       f"{list(fractions)})",
        "modalities": list(BRATS_MODALITIES),
        "labels": BRATS_LABEL_NAMES[convention],
        "label_convention": convention,
    }
    return _write_checked(Path(out), sections, **meta)


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
    return _write_checked(out_dir / "datalist.json", sections, **meta)


# -------------------------------------------------------------------------------------------------------- validate
def validate(path: str | os.PathLike, sections: Sequence[str] | None = None, *, check_images: bool | str = True,
             require_label: bool = False) -> str:
    """Validate ``sections`` (default: all present) and return a printable summary; raises DatalistError."""
    doc = read_datalist(path)
    names = list(sections) if sections else [s for s in SECTIONS if s in doc]
    if not names:
        raise DatalistError(f"datalist {path}: has none of the sections {list(SECTIONS)}")
    checked = {True: "OK", "header": "OK (headers checked; `validate` reads every voxel)", False: "OK (files exist)"}
    lines = [f"datalist {Path(path).absolute()}: {checked[check_images]}",
             f"  modalities: {doc.get('modalities', 'not declared')}"]
    if doc.get("covariates"):
        lines.append(f"  covariates: {list(doc['covariates'])}")
    if doc.get("label_convention"):
        lines.append(f"  label_convention: {doc['label_convention']}")
    for name in names:
        items = load_datalist(path, name, check_images=check_images, require_label=require_label)
        labelled = sum(1 for it in items if "label" in it)
        lines.append(f"  {name}: {len(items)} items, {labelled} with label")
        if check_images:
            from meddiff3d.data.images import read_header

            first = items[0]["image"]
            info = read_header(first[0] if isinstance(first, list) else first)
            lines.append(f"    first item: shape {tuple(info.shape)}, spacing "
                         f"{tuple(round(s, 3) for s in info.spacing)} mm")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="datalist_command", required=True)

    p = sub.add_parser("brats", help="index a BraTS 2021/2023 folder as a datalist")
    p.add_argument("src", help="folder of BraTS case folders")
    p.add_argument("--out", required=True, help="datalist JSON to write")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-incomplete", action="store_true", help="skip (with a warning) cases missing a sequence")

    p = sub.add_parser("t1", help="convert a T1 cohort to 1 mm RAS 160x224x160 NIfTI + datalist")
    p.add_argument("src", help="folder of NIfTI/NRRD files or DICOM series folders")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--covariates", help="CSV with an id column and one column per covariate")
    p.add_argument("--covariate-ranges", help="JSON with fixed scaling per covariate (e.g. a training datalist: its "
                   "'covariates' block is used); default: the cohort's own min/max")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction before resampling")
    p.add_argument("--n4-shrink", type=int, default=4)
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--shape", type=int, nargs=3, default=T1_SHAPE)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("validate", help="validate a datalist (files, geometry, values, covariates)")
    p.add_argument("datalist")
    p.add_argument("--section", action="append", choices=SECTIONS, help="section(s) to check (default: all present)")
    p.add_argument("--require-label", action="store_true")
    p.add_argument("--header-only", action="store_true", help="read headers only (fast; no NaN/truncation check)")


def _read_ranges(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"covariate ranges {path}: cannot read JSON ({err})") from err
    ranges = doc.get("covariates", doc) if isinstance(doc, dict) else None
    if not isinstance(ranges, dict) or not all(isinstance(v, dict) for v in ranges.values()):
        raise InputError(f"covariate ranges {path}: expected {{name: {{'min', 'max'}} or {{'categories'}}}}")
    return ranges


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.datalist_command == "brats":
        out = brats_to_datalist(args.src, args.out, fractions=args.fractions, seed=args.seed,
                                skip_incomplete=args.skip_incomplete)
        print(validate(out, check_images="header"))
    elif args.datalist_command == "t1":
        out = t1_cohort_to_dataset(args.src, args.out, covariates_csv=args.covariates, n4=args.n4,
                                   covariate_ranges=_read_ranges(args.covariate_ranges),
                                   spacing=args.spacing, shape=args.shape, fractions=args.fractions, seed=args.seed,
                                   n4_shrink=args.n4_shrink)
        print(validate(out, check_images="header"))
    else:
        print(validate(args.datalist, args.section, check_images="header" if args.header_only else True,
                       require_label=args.require_label))
    return 0
