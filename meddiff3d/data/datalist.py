"""The one dataset layout and datalist format of meddiff3d.

Layout of a dataset folder (what the synthetic generators and the conversion scripts write)::

    DATASET/
      datalist.json
      images/<id>_<modality>.nii.gz     one file per modality (or a DICOM series folder, or .nrrd)
      labels/<id>_seg.nii.gz            optional label map / ground-truth mask

Datalist JSON (paths are relative to the folder holding the JSON, or absolute)::

    {
      "name": "synthetic-brats",
      "description": "...",
      "modalities": ["t1", "t1ce", "t2", "flair"],        # order of the image channels; length = channels
      "covariates": {"age": {"min": 40, "max": 90, "unit": "years"}, ...},   # allowed covariate names (+ scaling)
      "labels": {"0": "background", "1": "NCR", "2": "ED", "4": "ET"},       # optional, for label maps
      "label_convention": "brats2021",                    # optional: brats2021 (1/2/4) or brats2023 (1/2/3)
      "training":   [ITEM, ...],
      "validation": [ITEM, ...],
      "test":       [ITEM, ...]
    }

    ITEM = {
      "id": "sub-0000",
      "image": "images/sub-0000_t1.nii.gz"  or  ["images/sub-0000_t1.nii.gz", ...]   # one per modality, in order
      "label": "labels/sub-0000_seg.nii.gz",              # optional
      "covariates": {"age": 0.41, "sex": 1.0, ...},       # optional, values scaled to [0, 1]
      ... any further keys (e.g. "lesion_kind") are kept as they are
    }

Covariate values in items are the model inputs, scaled to [0, 1]; the top-level ``covariates`` block documents the
scaling (``value = (raw - min) / (max - min)``, or ``index / (len(categories) - 1)`` for a ``categories`` list) so raw
values can be recovered.

:func:`load_datalist` reads one section and validates all of it before returning (see its docstring); every problem
is reported as :class:`~meddiff3d.errors.DatalistError` naming the datalist file, the item and what is wrong.
"""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from meddiff3d.errors import DatalistError, ImageError, InputError
from meddiff3d.utils.io import read_json, save_json

SECTIONS = ("training", "validation", "test")


def write_datalist(path: str | os.PathLike, sections: Mapping[str, Sequence[Mapping[str, Any]]], **meta: Any) -> Path:
    """Write a datalist JSON atomically; item paths are made relative to the JSON's folder where possible.

    ``sections`` maps section names (``training``/``validation``/``test``) to item lists; ``meta`` holds the
    top-level keys (``name``, ``description``, ``modalities``, ``covariates``, ``labels``, ...).
    """
    path = Path(path)
    root = path.parent.resolve()
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown datalist sections {sorted(unknown)}; expected {list(SECTIONS)}")

    def rel(p):
        p = Path(p)
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return str(p)

    def fix(item):
        out = dict(item)
        for key in ("image", "label"):
            if key in out and out[key] is not None:
                out[key] = [rel(p) for p in out[key]] if isinstance(out[key], (list, tuple)) else rel(out[key])
        return out

    doc = dict(meta)
    for name in SECTIONS:
        if name in sections:
            doc[name] = [fix(item) for item in sections[name]]
    return save_json(doc, path)


#: at most this many problems are listed in one DatalistError message
MAX_REPORTED_PROBLEMS = 20


def read_datalist(path: str | os.PathLike) -> dict:
    """The datalist JSON as a dict (no validation of items); raises :class:`DatalistError` if missing or not JSON."""
    path = Path(path)
    doc = read_json(path, missing="datalist {path}: file not found", invalid="datalist {path}: not valid JSON ({err})",
                    error=DatalistError)
    if not isinstance(doc, dict):
        raise DatalistError(f"datalist {path}: top level must be a JSON object, got {type(doc).__name__}")
    return doc


def load_datalist(
    path: str | os.PathLike,
    section: str = "training",
    *,
    modalities: int | Sequence[str] | None = None,
    require_label: bool = False,
    covariates: Sequence[str] | None = None,
    check_images: bool | str = True,
) -> list[dict]:
    """The items of one datalist ``section``, with absolute paths, validated before anything is returned.

    Args:
        path: the datalist JSON.
        section: ``training``, ``validation`` or ``test``; it must exist and hold at least one item.
        modalities: expected image channels, as a count or as names (names must equal the JSON's ``modalities``);
            default: the JSON's ``modalities`` (if it has none, any count is accepted, but all items must agree).
        require_label: every item must have a ``label``.
        covariates: allowed covariate names; default: the keys of the JSON's ``covariates`` block (an item with
            covariates and no declared names is an error). Values must be finite numbers in [0, 1].
        check_images: ``True`` reads every voxel (detects truncated files and NaN/Inf), ``"header"`` reads headers
            only (fast: shapes and affines), ``False`` only checks that the files exist.

    Image checks: each image is 3D (``x, y, z, 1`` counts as 3D), all modalities of an item and its label share one
    voxel grid (same shape, affines within 1e-3 mm).

    Returns items as dicts: ``image`` (a str, or a list of str when the JSON has a list) and ``label`` made absolute;
    the top-level ``label_convention`` is copied into each item as ``convention`` (an item key may not start with
    ``image_`` or ``label_``: MONAI takes such keys for metadata dicts); other keys are kept as they are.

    Raises:
        DatalistError: naming the datalist file, the item (``section[index] (id ...)``) and each problem found.
    """
    path = Path(path).absolute()
    doc = read_datalist(path)
    root = path.parent
    where_file = f"datalist {path}"

    if section not in doc:
        present = [name for name in SECTIONS if name in doc]
        raise DatalistError(f"{where_file}: has no section {section!r} (sections present: {present})")
    items = doc[section]
    if not isinstance(items, list) or not items:
        raise DatalistError(f"{where_file}: section {section!r} must be a non-empty list of items")

    names, count = _expected_modalities(doc.get("modalities"), modalities, where_file)
    allowed = _allowed_covariates(doc.get("covariates"), covariates, where_file)
    read_data = check_images is True
    problems: list[str] = []
    out: list[dict] = []
    seen_ids: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"{section}[{index}]"
        if isinstance(item, Mapping) and "id" in item:
            where += f" (id {item['id']})"
            if item["id"] in seen_ids:
                problems.append(f"{where}: duplicate id, also at {section}[{seen_ids[item['id']]}]")
            seen_ids.setdefault(item["id"], index)
        item_problems, resolved = _check_item(item, root, count, names, require_label, allowed, check_images, read_data)
        problems += [f"{where}: {p}" for p in item_problems]
        if resolved is not None:
            if "label_convention" in doc and "convention" not in resolved:
                resolved["convention"] = doc["label_convention"]
            out.append(resolved)
        if count is None and resolved is not None:  # no declared modalities: the first item fixes the count
            count = len(resolved["image"]) if isinstance(resolved["image"], list) else 1
    if problems:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        if len(problems) == 1:
            raise DatalistError(f"{where_file}: {problems[0]}")
        raise DatalistError(f"{where_file}: {len(problems)} problems:\n  " + "\n  ".join(shown) + tail)
    return out


def _expected_modalities(declared, requested, where_file) -> tuple[list[str] | None, int | None]:
    if declared is not None and (not isinstance(declared, list) or not all(isinstance(m, str) for m in declared)):
        raise DatalistError(f"{where_file}: 'modalities' must be a list of names, got {declared!r}")
    if requested is None:
        return declared, (len(declared) if declared else None)
    if isinstance(requested, int):
        if declared is not None and len(declared) != requested:
            raise DatalistError(
                f"{where_file}: wrong number of modalities: expected {requested}, the datalist declares "
                f"{len(declared)} {declared}"
            )
        return declared, requested
    requested = list(requested)
    if declared is not None and list(declared) != requested:
        raise DatalistError(f"{where_file}: modalities {declared} differ from the expected {requested}")
    return requested, len(requested)


def _allowed_covariates(declared, requested, where_file) -> set[str]:
    if requested is not None:
        return set(requested)
    if declared is None:
        return set()
    if not isinstance(declared, Mapping):
        raise DatalistError(f"{where_file}: 'covariates' must be an object mapping names to their scaling")
    return set(declared)


def _check_item(item, root, count, names, require_label, allowed, check_images, read_data):
    """``(problems, resolved item or None)`` for one datalist item."""
    from meddiff3d.data.images import check_image, grid_mismatch

    if not isinstance(item, Mapping):
        return [f"item must be a JSON object, got {type(item).__name__}"], None
    problems: list[str] = []
    out = dict(item)
    clashes = [k for k in item if isinstance(k, str) and k.startswith(("image_", "label_"))]
    if clashes:
        problems.append(f"keys {clashes} start with 'image_'/'label_', which MONAI transforms take for metadata")
    image = item.get("image")
    if image is None or image == [] or image == "":
        return ["no 'image'"], None
    files = image if isinstance(image, list) else [image]
    if not all(isinstance(f, str) and f for f in files):
        return [f"'image' must be a path or a list of paths, got {image!r}"], None
    if count is not None and len(files) != count:
        named = f" {names}" if names else ""
        problems.append(f"wrong number of modalities: {len(files)} image(s), expected {count}{named}")
    abs_files = [str(_resolve(f, root)) for f in files]
    out["image"] = abs_files if isinstance(image, list) else abs_files[0]

    label = item.get("label")
    if label is not None and not (isinstance(label, str) and label):
        problems.append(f"'label' must be a path, got {label!r}")
        label = None
    if label is not None:
        out["label"] = str(_resolve(label, root))
    elif require_label:
        problems.append("no 'label' (required)")

    problems += _covariate_problems(item.get("covariates"), allowed)

    paths = [("image", f) for f in abs_files] + ([("label", out["label"])] if label is not None else [])
    infos = []
    for role, file in paths:
        if not Path(file).exists():
            problems.append(f"{role} file not found: {file}")
            continue
        if check_images is False:
            continue
        try:
            infos.append((role, check_image(file, read_data=read_data)))
        except ImageError as err:
            problems.append(f"{role} {err}")
    if len(infos) > 1:
        ref_role, ref = infos[0]
        for role, info in infos[1:]:
            mismatch = grid_mismatch(ref, info)
            if mismatch:
                problems.append(f"{role} {info.path}: {mismatch}")
    return problems, out


def _covariate_problems(values, allowed) -> list[str]:
    if values is None:
        return []
    if not isinstance(values, Mapping):
        return [f"'covariates' must be an object of name: value, got {values!r}"]
    problems = []
    for name, value in values.items():
        if name not in allowed:
            declared = sorted(allowed) if allowed else "none declared"
            problems.append(f"unknown covariate {name!r} (allowed: {declared})")
        if isinstance(value, bool) or not isinstance(value, Real):
            problems.append(f"covariate {name!r} = {value!r} is not a number")
        elif not math.isfinite(value) or not 0.0 <= value <= 1.0:
            problems.append(f"covariate {name!r} = {value!r} is outside [0, 1] (scale it, see docs/data.md)")
    return problems


def _resolve(file: str, root: Path) -> Path:
    p = Path(file).expanduser()
    return p if p.is_absolute() else (root / p)


def split_ids(ids: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, list]:
    """Shuffle sorted ``ids`` with ``seed`` and cut them into training/validation/test by ``fractions``."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise InputError(f"fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    order = list(np.random.default_rng(seed).permutation(sorted(ids)))
    n_train = int(round(fractions[0] * len(order)))
    n_val = min(int(round(fractions[1] * len(order))), len(order) - n_train)
    parts = {"training": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: [str(i) for i in part] for name, part in parts.items() if part}


def write_checked_datalist(out: Path, sections: Mapping[str, list], **meta) -> Path:
    """Write the datalist, validate every section (headers only); on a problem remove the file and re-raise."""
    write_datalist(out, sections, **meta)
    try:
        for name in sections:
            load_datalist(out, name, check_images="header")
    except DatalistError:
        out.unlink(missing_ok=True)
        raise
    return out
