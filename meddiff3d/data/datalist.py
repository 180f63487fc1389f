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
      "spatial_dims": 2,                                  # optional: 3 (volumes, the default) or 2 (images)
      "training":   [ITEM, ...],
      "validation": [ITEM, ...],
      "test":       [ITEM, ...]
    }

    ITEM = {
      "id": "sub-0000",
      "image": "images/sub-0000_t1.nii.gz"  or  ["images/sub-0000_t1.nii.gz", ...]   # one per modality, in order
      "label": "labels/sub-0000_seg.nii.gz",              # optional
      "brain_mask": "masks/sub-0000_brain.nii.gz",        # optional (datalist t1 --skull-strip writes it)
      "covariates": {"age": 0.41, "sex": 1.0, ...},       # optional, values scaled to [0, 1]
      ... any further keys (e.g. "lesion_kind") are kept as they are
    }

A 2D datalist (``"spatial_dims": 2``) lists 2D images (PNG, JPEG, single-frame DICOM, 2D NIfTI:
:mod:`meddiff3d.data.images2d`), grayscale, all of a section of one size (``scripts/`` conversions resample them).

Covariate values in items are the model inputs, scaled to [0, 1]; the top-level ``covariates`` block documents the
scaling (``value = (raw - min) / (max - min)``, or ``index / (len(categories) - 1)`` for a ``categories`` list) so raw
values can be recovered.

:func:`load_datalist` reads one section and validates all of it before returning (see its docstring),
:func:`check_datalist` every section (an empty one is allowed beside one with items); every problem is reported as
:class:`~meddiff3d.errors.DatalistError` naming the datalist file, the item and what is wrong. Item ids are safe
file names (:func:`meddiff3d.checks.safe_name`).
"""

from __future__ import annotations

import math
import os
from numbers import Real
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from meddiff3d.checks import check_int, raise_problems, safe_name
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
        for key in ("image", "label", "brain_mask"):
            if key in out and out[key] is not None:
                out[key] = [rel(p) for p in out[key]] if isinstance(out[key], (list, tuple)) else rel(out[key])
        return out

    doc = dict(meta)
    for name in SECTIONS:
        if name in sections:
            doc[name] = [fix(item) for item in sections[name]]
    return save_json(doc, path)


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
    content: bool = False,
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
        content: also the content checks of :func:`~meddiff3d.data.images.check_image` on every image (not on
            labels): no constant or all-zero volume, no complex or non-numeric voxels, spacing within 0.1-10 mm.
            For inputs a model detects or segments in; needs ``check_images=True``.

    Item ids must be safe file names (:func:`~meddiff3d.checks.safe_name`: no path separators, ``..``, absolute
    paths or control characters), as outputs are named after them. Image checks: each image is 3D (``x, y, z, 1``
    counts as 3D), all modalities of an item and its label share one voxel grid (same shape, affines within 1e-3 mm).

    Returns items as dicts: ``image`` (a str, or a list of str when the JSON has a list) and ``label`` made absolute;
    the top-level ``label_convention`` is copied into each item as ``convention`` (an item key may not start with
    ``image_`` or ``label_``: MONAI takes such keys for metadata dicts); other keys are kept as they are.

    Raises:
        DatalistError: naming the datalist file, the item (``section[index] (id ...)``) and each problem found.
    """
    if content and check_images is not True:
        raise ValueError("load_datalist(content=True) reads every voxel: it needs check_images=True")
    path = Path(path).absolute()
    doc = read_datalist(path)
    problem = _section_problem(doc, section)
    if problem:
        raise DatalistError(f"datalist {path}: {problem}")
    items, problems = _load_section(path, doc, section, modalities=modalities, require_label=require_label,
                                    covariates=covariates, check_images=check_images, content=content)
    raise_problems(f"datalist {path}", problems, DatalistError)
    return items


def check_datalist(path: str | os.PathLike, sections: Sequence[str] | None = None, **checks: Any) -> dict[str, list]:
    """``{section: items}`` of ``sections`` (default: every section present), each checked as :func:`load_datalist`
    checks one (``checks``: its keyword arguments), all problems of all sections reported in one
    :class:`DatalistError`. An empty section (``"training": []``) is allowed when another checked section holds items.
    """
    if checks.get("content") and checks.get("check_images", True) is not True:
        raise ValueError("check_datalist(content=True) reads every voxel: it needs check_images=True")
    path = Path(path).absolute()
    doc = read_datalist(path)
    names = list(sections) if sections else [name for name in SECTIONS if name in doc]
    if not names:
        raise DatalistError(f"datalist {path}: has none of the sections {list(SECTIONS)}")
    problems: list[str] = []
    out: dict[str, list] = {}
    for name in names:
        if doc.get(name) == []:
            out[name] = []
            continue
        problem = _section_problem(doc, name)
        if problem:
            problems.append(problem)
            continue
        out[name], section_problems = _load_section(path, doc, name, **checks)
        problems += section_problems
    if not problems and not any(out.values()):
        problems.append(f"every section checked is empty ({', '.join(names)}); a datalist needs items")
    raise_problems(f"datalist {path}", problems, DatalistError)
    return out


def _section_problem(doc: Mapping, section: str) -> str | None:
    """What is wrong with ``doc[section]`` as a whole (missing, not a list, empty), or ``None``."""
    if section not in doc:
        present = [name for name in SECTIONS if name in doc]
        return f"has no section {section!r} (sections present: {present})"
    items = doc[section]
    if not isinstance(items, list) or not items:
        filled = [name for name in SECTIONS if isinstance(doc.get(name), list) and doc[name]]
        got = "it is empty" if items == [] else f"got {type(items).__name__}"
        return (f"section {section!r} must be a non-empty list of items ({got}; sections with items: "
                f"{', '.join(filled) or 'none'})")
    return None


def _load_section(path: Path, doc: Mapping, section: str, *, modalities=None, require_label: bool = False,
                  covariates=None, check_images: bool | str = True, content: bool = False) -> tuple[list, list]:
    """``(resolved items, problems)`` of the non-empty list ``doc[section]`` (see :func:`load_datalist`)."""
    where_file = f"datalist {path}"
    dims = doc.get("spatial_dims", 3)
    if dims not in (2, 3) or isinstance(dims, bool):
        raise DatalistError(f"{where_file}: 'spatial_dims' must be 2 or 3, got {dims!r}")
    names, count = _expected_modalities(doc.get("modalities"), modalities, where_file)
    allowed = _allowed_covariates(doc.get("covariates"), covariates, where_file)
    read_data = check_images is True
    problems: list[str] = []
    out: list[dict] = []
    seen_ids: dict[str, int] = {}
    shapes: list[tuple[int, int]] = []  # 2D: the size of each image read
    sizes: dict[tuple[int, int], list[str]] = {}  # 2D: size -> the items of that size
    for index, item in enumerate(doc[section]):
        where = f"{section}[{index}]"
        if isinstance(item, Mapping) and "id" in item:
            try:
                case = safe_name("item id", item["id"])
            except InputError as err:
                problems.append(f"{where}: {err}")
            else:
                where += f" (id {case})"
                if case in seen_ids:
                    problems.append(f"{where}: duplicate id, also at {section}[{seen_ids[case]}]")
                seen_ids.setdefault(case, index)
        read = len(shapes)
        item_problems, resolved = _check_item(item, path.parent, count, names, require_label, allowed, check_images,
                                              read_data, content, dims, shapes)
        for shape in shapes[read:]:
            sizes.setdefault(shape, []).append(where)
        problems += [f"{where}: {p}" for p in item_problems]
        if resolved is not None:
            if "label_convention" in doc and "convention" not in resolved:
                resolved["convention"] = doc["label_convention"]
            out.append(resolved)
        if count is None and resolved is not None:  # no declared modalities: the first item fixes the count
            count = len(resolved["image"]) if isinstance(resolved["image"], list) else 1
    if len(sizes) > 1:
        counts = ", ".join(f"{len(w)} of {s[0]} rows x {s[1]} columns (first {w[0]})" for s, w in sizes.items())
        problems.append(f"images differ in size: {counts}; a 2D datalist's images share one size")
    return out, problems


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


def _check_item(item, root, count, names, require_label, allowed, check_images, read_data, content=False, dims=3,
                shapes=None):
    """``(problems, resolved item or None)`` for one datalist item; a 2D item's image sizes are appended to
    ``shapes``."""
    from meddiff3d.data.images import check_image, grid_mismatch
    from meddiff3d.data.images2d import image_2d_size, read_image_2d

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
    brain = item.get("brain_mask")
    if brain is not None:
        if isinstance(brain, str) and brain:
            out["brain_mask"] = str(_resolve(brain, root))
            if not Path(out["brain_mask"]).exists():
                problems.append(f"brain_mask file not found: {out['brain_mask']}")
        else:
            problems.append(f"'brain_mask' must be a path, got {brain!r}")

    paths = [("image", f) for f in abs_files] + ([("label", out["label"])] if label is not None else [])
    infos = []
    for role, file in paths:
        if not Path(file).exists():
            problems.append(f"{role} file not found: {file}")
            continue
        if check_images is False:
            continue
        try:
            if dims == 2:
                shapes.append(read_image_2d(file).shape if read_data else image_2d_size(file))
                continue
            infos.append((role, check_image(file, read_data=read_data, content=content and role == "image")))
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
    order = list(np.random.default_rng(check_int("seed", seed, 0)).permutation(sorted(ids)))
    n_train = int(round(fractions[0] * len(order)))
    n_val = min(int(round(fractions[1] * len(order))), len(order) - n_train)
    parts = {"training": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {name: [str(i) for i in part] for name, part in parts.items() if part}


def write_checked_datalist(out: Path, sections: Mapping[str, list], *, check_images: bool | str = "header",
                           **meta) -> Path:
    """Write the datalist beside ``out``, validate every section there (``check_images``: headers only by default,
    ``True`` reads every voxel) and only then rename it to ``out``; on a problem nothing is left and the error is
    re-raised."""
    from meddiff3d.utils.io import atomic_path

    out = Path(out)
    with atomic_path(out) as staging:  # same folder: the relative paths hold after the rename
        write_datalist(staging, sections, **meta)
        try:
            for name in sections:
                load_datalist(staging, name, check_images=check_images)
        except DatalistError as err:  # name the datalist the user asked for, not the staging file
            raise DatalistError(str(err).replace(str(staging.absolute()), str(out.absolute()))) from None
    return out
