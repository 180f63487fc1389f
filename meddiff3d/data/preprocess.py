"""Real data -> the meddiff3d layout: BraTS folders and T1 cohorts to datalists, and the ``datalist`` CLI.

``meddiff3d datalist brats SRC --out DATALIST.json``
    Index a BraTS training folder in place (no copies). Both namings are detected, per case folder::

        BraTS 2021: BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz      labels 1/2/4
        BraTS 2023: BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz  labels 1/2/3

    Modalities are always ``[t1, t1ce, t2, flair]`` (2023: t1n, t1c, t2w, t2f); ``label_convention`` records which
    label values the ``seg`` files use. Cases are split into training/validation/test by ``--fractions`` with
    ``--seed``. A case missing a sequence is an error, or skipped with a warning under ``--skip-incomplete``.
    Symbolic links to case folders are followed; broken links, symlink loops, unreadable folders, case ids that are
    no safe file name and two files for one sequence are all reported in one error. Every voxel of every file is
    read before the datalist is kept (``--header-only``: headers only, fast).

``meddiff3d datalist t1 SRC --out DIR [--covariates CSV [--covariate-ranges JSON]] [--n4] [--skull-strip]``
    Convert a T1 cohort (NIfTI/NRRD files, or one folder per DICOM series, in SRC) to ``DIR/images/<id>_t1.nii.gz``
    on a 1 mm RAS grid of 160x224x160 voxels centred on the head's centre of mass (optionally N4 bias corrected
    first; ``--skull-strip``: zero outside a registered brain mask, kept as ``DIR/masks/<id>_brain.nii.gz``) and
    ``DIR/datalist.json``. Covariates from the CSV (``id`` column + one column per covariate) are scaled
    to [0, 1]: numeric columns by ``(raw - min) / (max - min)`` over the cohort, text columns (e.g. sex ``F``/``M``)
    by ``index / (n_categories - 1)`` in sorted category order; the scaling is recorded in the datalist.

``meddiff3d datalist validate DATALIST [--section S] [--content]``
    Check every section (:func:`~meddiff3d.data.datalist.check_datalist`; all problems of all sections in one
    error, an empty section allowed beside one with items) and print a summary. ``--content`` adds the checks of
    images to detect or segment in (no constant volume, real voxels, spacing 0.1-10 mm).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

from meddiff3d.checks import check_output_dir, raise_problems, safe_name
from meddiff3d.data.brats import BRATS_MODALITIES
from meddiff3d.data.datalist import SECTIONS, check_datalist, read_datalist, split_ids, write_checked_datalist
from meddiff3d.data.folders import scan_folder
from meddiff3d.data.t1_conversion import T1_SHAPE, t1_cohort_to_dataset
from meddiff3d.errors import InputError

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


# ----------------------------------------------------------------------------------------------------------- BraTS
def find_brats_cases(src: str | os.PathLike, skip_incomplete: bool = False) -> tuple[str, dict[str, dict]]:
    """``(label_convention, {case_id: {"t1": path, ..., "seg": path (if present)}})`` for a BraTS folder."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(f"{src}: BraTS folder not found")
    cases: dict[str, dict[str, Path]] = {}
    conventions: dict[str, set] = {}
    problems: list[str] = []
    for file, _ in scan_folder(src, problems, recursive=True):
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
        try:
            safe_name(f"BraTS case id (from {file})", case)
        except InputError as err:
            problems.append(str(err))
            continue
        conventions.setdefault(convention, set()).add(case)
        files = cases.setdefault(case, {})
        modality = BRATS_NAMING[convention][seq]
        if modality in files:
            problems.append(f"case {case} has two {seq} files: {files[modality]} and {file}")
            continue
        files[modality] = file
    raise_problems(f"BraTS folder {src}", problems)
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
    check_images: bool | str = True,
) -> Path:
    """Index a BraTS 2021 or 2023 folder as a datalist at ``out`` (images stay where they are); returns ``out``.

    The datalist is kept only if every item passes :func:`~meddiff3d.data.datalist.load_datalist` with
    ``check_images`` (default ``True``: every voxel read, so a truncated file is an error naming it; ``"header"``:
    headers only).
    """
    out = Path(out)
    check_output_dir(out.parent, "datalist brats --out (its folder)")
    if out.is_dir():
        raise InputError(f"datalist brats --out {out.absolute()} is a folder; give the datalist JSON file to write")
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
    return write_checked_datalist(out, sections, check_images=check_images, **meta)


# -------------------------------------------------------------------------------------------------------- validate
def validate(path: str | os.PathLike, sections: Sequence[str] | None = None, *, check_images: bool | str = True,
             require_label: bool = False, content: bool = False) -> str:
    """Validate ``sections`` (default: all present; :func:`~meddiff3d.data.datalist.check_datalist`) and return a
    printable summary; raises DatalistError listing the problems of every section."""
    checked_sections = check_datalist(path, sections, check_images=check_images, require_label=require_label,
                                      content=content)
    doc = read_datalist(path)
    checked = {True: "OK", "header": "OK (headers checked; `validate` reads every voxel)", False: "OK (files exist)"}
    if content:
        checked[True] = "OK (every voxel and the content checked)"
    lines = [f"datalist {Path(path).absolute()}: {checked[check_images]}",
             f"  modalities: {doc.get('modalities', 'not declared')}"]
    if doc.get("covariates"):
        lines.append(f"  covariates: {list(doc['covariates'])}")
    if doc.get("label_convention"):
        lines.append(f"  label_convention: {doc['label_convention']}")
    for name, items in checked_sections.items():
        if not items:
            lines.append(f"  {name}: empty")
            continue
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
    p.add_argument("--header-only", action="store_true", help="check headers only (fast; no truncation check)")

    p = sub.add_parser("t1", help="convert a T1 cohort to 1 mm RAS 160x224x160 NIfTI + datalist")
    p.add_argument("src", help="folder of NIfTI/NRRD files or DICOM series folders")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--covariates", help="CSV with an id column and one column per covariate")
    p.add_argument("--covariate-ranges", help="JSON with fixed scaling per covariate (e.g. a training datalist: its "
                   "'covariates' block is used); default: the cohort's own min/max")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction before resampling")
    p.add_argument("--n4-shrink", type=int, default=4)
    p.add_argument("--skull-strip", action="store_true", help="brain mask by registering nilearn's MNI152 template "
                   "(offline; meddiff3d.data.brain_mask): zero outside the brain, masks/<id>_brain.nii.gz; the "
                   "models expect skull-stripped T1")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    p.add_argument("--shape", type=int, nargs=3, default=T1_SHAPE)
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("validate", help="validate a datalist (files, geometry, values, covariates)")
    p.add_argument("datalist")
    p.add_argument("--section", action="append", choices=SECTIONS, help="section(s) to check (default: all present)")
    p.add_argument("--require-label", action="store_true")
    p.add_argument("--header-only", action="store_true", help="read headers only (fast; no NaN/truncation check)")
    p.add_argument("--content", action="store_true", help="also reject constant or all-zero images, complex or "
                   "non-numeric voxels and spacing outside 0.1-10 mm (the checks of inputs to detect or segment in)")


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
                                skip_incomplete=args.skip_incomplete,
                                check_images="header" if args.header_only else True)
        print(validate(out, check_images="header"))
    elif args.datalist_command == "t1":
        out = t1_cohort_to_dataset(args.src, args.out, covariates_csv=args.covariates, n4=args.n4,
                                   covariate_ranges=_read_ranges(args.covariate_ranges),
                                   spacing=args.spacing, shape=args.shape, fractions=args.fractions, seed=args.seed,
                                   n4_shrink=args.n4_shrink, skull_strip=args.skull_strip)
        print(validate(out, check_images="header"))
    else:
        if args.content and args.header_only:
            raise InputError("datalist validate: --content reads every voxel; it cannot go with --header-only")
        print(validate(args.datalist, args.section, check_images="header" if args.header_only else True,
                       require_label=args.require_label, content=args.content))
    return 0
