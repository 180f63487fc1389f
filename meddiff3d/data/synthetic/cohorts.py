"""Write synthetic cohorts as datasets in the meddiff3d layout (``images/``, ``labels/``, ``datalist.json``).

Three kinds (:data:`KINDS`):

* ``healthy`` -- T1 volumes with covariates (age, sex, measured brain and ventricular volume);
* ``brats``   -- t1, t1ce, t2, flair + BraTS 2021 label maps (1 NCR, 2 ED, 4 ET);
* ``anomaly`` -- healthy T1 for training/validation; test T1 with lesions of each kind in turn (``tumour``,
  ``multifocal``, ``dark``, ``none``) and a binary ground-truth mask per test item (empty for ``none``).

Splits are a function of the subject index only, so subject ``k`` lands in the same split whatever ``n`` is:
``u_k = frac((k + 1) * 0.618...)`` (golden-ratio sequence, evenly spread for every prefix); ``u_k >= 1 - test``
-> test, ``u_k >= 1 - test - validation`` -> validation, else training. The ``j``-th test subject of an anomaly set
gets lesion kind ``TEST_KINDS[j % 4]``, again independent of ``n``.

Covariates in items are scaled to [0, 1] with the fixed ranges of :data:`COVARIATE_SCALING` (clipped; documented in
the datalist's top-level ``covariates`` block); the raw values are kept in ``covariates_raw``. The cohort's covariate
ranges and correlation matrix (:func:`covariate_summary`) are recorded under ``synthetic.covariate_summary`` and printed
by ``synth``: the covariates are drawn independently (:mod:`.subjects`), so a conditional model can learn each apart.
Each item's ``acquisition`` holds, per sequence, what its image drew (:func:`.contrast.acquisition_record`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meddiff3d.checks import check_memory, check_output_dir, check_voxels
from meddiff3d.data.datalist import write_datalist
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_nifti

from .acquisition import OUT_OF_TEMPLATE_FAMILIES, VARIANTS
from .anatomy import SOURCES, load_anatomy
from .contrast import SEQUENCES
from .grid import DEFAULT_SHAPE, FOV_MM, grid_for_shape
from .lesions import BRATS2021_LABELS
from .subjects import AGE_RANGE, anomaly_subject, brats_subject, healthy_subject

KINDS = ("healthy", "brats", "anomaly")
#: bumped when the same request (kind, n, seed, shape, ...) gives different subjects: 2 = independent covariates
#: (ventricle enlargement and head size as their own factors) and the acquisition variants
GENERATOR_VERSION = 2
COHORT_VARIANTS = (*VARIANTS[:2], "out_of_template", *VARIANTS[2:])  # standard, varied, out_of_template, families
TEST_KINDS = ("tumour", "multifocal", "dark", "none")
DEFAULT_FRACTIONS = {"healthy": (0.2, 0.0), "brats": (0.2, 0.0), "anomaly": (0.1, 0.3)}  # (validation, test)
COVARIATE_SCALING = {
    "age": {"min": AGE_RANGE[0], "max": AGE_RANGE[1], "unit": "years"},
    "sex": {"min": 0.0, "max": 1.0, "unit": "0 = female, 1 = male", "categories": ["female", "male"]},
    "brain_volume": {"min": 800.0, "max": 1800.0, "unit": "mL", "measure": "sum of GM + WM fractions"},
    "ventricular_volume": {"min": 0.0, "max": 80.0, "unit": "mL", "measure": "sum of lateral ventricle fractions"},
}
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
#: peak memory of generating one subject, per voxel of the output grid (measured 160-280 bytes on procedural
#: anatomy from 32x48x32 to 128x192x128 voxels, every kind), for the preflight check of :func:`write_cohort`
SYNTH_BYTES_PER_VOXEL = 300


def split_of(index: int, val_fraction: float, test_fraction: float) -> str:
    """``training``, ``validation`` or ``test`` for subject ``index`` (independent of the cohort size)."""
    u = ((index + 1) * _GOLDEN) % 1.0
    if u >= 1.0 - test_fraction:
        return "test"
    if u >= 1.0 - test_fraction - val_fraction:
        return "validation"
    return "training"


def test_lesion_kind(index: int, val_fraction: float, test_fraction: float) -> str:
    """Lesion kind of anomaly test subject ``index``: the kinds in turn over the test subjects in index order."""
    rank = sum(split_of(k, val_fraction, test_fraction) == "test" for k in range(index))
    return TEST_KINDS[rank % len(TEST_KINDS)]


def scale_covariates(raw: dict[str, float]) -> dict[str, float]:
    """Covariates scaled to [0, 1] with :data:`COVARIATE_SCALING` (clipped)."""
    out = {}
    for name, value in raw.items():
        lo, hi = COVARIATE_SCALING[name]["min"], COVARIATE_SCALING[name]["max"]
        out[name] = round(float(np.clip((value - lo) / (hi - lo), 0.0, 1.0)), 6)
    return out


def covariate_summary(raw: list[dict[str, float]]) -> dict:
    """Ranges (raw units and as a share of :data:`COVARIATE_SCALING`'s range) and the Pearson correlation matrix of
    the covariates of a cohort (``raw`` = the subjects' ``covariates_raw``); r is NaN for a constant covariate."""
    names = [name for name in COVARIATE_SCALING if all(name in item for item in raw)]
    values = np.array([[item[name] for name in names] for item in raw], dtype=np.float64).reshape(len(raw), len(names))
    ranges = {}
    for j, name in enumerate(names):
        lo, hi = COVARIATE_SCALING[name]["min"], COVARIATE_SCALING[name]["max"]
        span = (float(values[:, j].min()), float(values[:, j].max())) if len(raw) else (math.nan, math.nan)
        ranges[name] = {"min": round(span[0], 3), "max": round(span[1], 3),
                        "share_of_range": round((min(span[1], hi) - max(span[0], lo)) / (hi - lo), 3)}
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(values.T) if len(raw) > 2 else np.full((len(names), len(names)), np.nan)
    corr = np.atleast_2d(corr)
    matrix = [[None if not np.isfinite(r) else round(float(r), 3) for r in row] for row in corr]
    return {"n": len(raw), "names": names, "ranges": ranges, "correlation": matrix}


def format_covariate_summary(summary: dict) -> list[str]:
    """The summary as text lines: one range line per covariate, then the correlation matrix."""
    names = summary["names"]
    lines = [f"  {name:19s} {r['min']:9.2f} .. {r['max']:9.2f}  ({100 * r['share_of_range']:.0f} % of the "
             f"documented range)" for name, r in summary["ranges"].items()]
    lines.append("  correlation (Pearson r)  " + "".join(f"{name[:10]:>11s}" for name in names))
    for name, row in zip(names, summary["correlation"]):
        lines.append(f"  {name:24s} " + "".join(f"{'-' if r is None else f'{r:+.2f}':>11s}" for r in row))
    return lines


@dataclass
class CohortSummary:
    kind: str
    datalist: Path
    counts: dict[str, int]
    seconds: float
    covariates: dict = field(default_factory=dict)

    def line(self) -> str:
        parts = ", ".join(f"{name} {count}" for name, count in self.counts.items())
        head = (f"synth {self.kind}: {sum(self.counts.values())} subjects ({parts}) -> {self.datalist} "
                f"in {self.seconds:.1f} s")
        if not self.covariates:
            return head
        return "\n".join([head, "covariates (raw units):", *format_covariate_summary(self.covariates)])


def _check(kind, n, seed, val_fraction, test_fraction, source):
    if kind not in KINDS:
        raise InputError(f"synthetic cohort kind {kind!r} is unknown; choose one of {list(KINDS)}")
    if int(n) < 1:
        raise InputError(f"synthetic cohort size n={n}: need at least 1 subject")
    if int(seed) < 0:
        raise InputError(f"synthetic seed {seed}: must be a non-negative integer")
    if source not in SOURCES:
        raise InputError(f"synthetic anatomy source {source!r} is unknown; choose one of {list(SOURCES)}")
    for name, value in (("validation fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"synthetic {name} {value}: must be within [0, 1]")
    if val_fraction + test_fraction > 1.0:
        raise InputError(f"synthetic validation + test fractions {val_fraction} + {test_fraction} exceed 1")


def write_cohort(kind: str, out_dir, n: int, seed: int = 0, shape=DEFAULT_SHAPE, source: str = "mni",
                 val_fraction: float | None = None, test_fraction: float | None = None,
                 skull_strip: bool = True, progress: bool = True, variant: str = "standard") -> CohortSummary:
    """Generate ``n`` subjects of ``kind`` into ``out_dir`` (images/, labels/, datalist.json); see module docstring.

    ``variant``: one of :data:`COHORT_VARIANTS`; ``out_of_template`` gives subject ``k`` the family
    ``OUT_OF_TEMPLATE_FAMILIES[k % 3]`` (``phantom`` = the procedural anatomy whatever ``source`` is), recorded in
    each item's ``variant``.
    """
    default_val, default_test = DEFAULT_FRACTIONS.get(kind, (0.2, 0.0))
    val_fraction = default_val if val_fraction is None else float(val_fraction)
    test_fraction = default_test if test_fraction is None else float(test_fraction)
    _check(kind, n, seed, val_fraction, test_fraction, source)
    if variant not in COHORT_VARIANTS:
        raise InputError(f"synthetic cohort variant {variant!r} is unknown; choose one of {list(COHORT_VARIANTS)}")
    if len(tuple(shape)) == 3 and all(isinstance(v, (int, np.integer)) and v >= 1 for v in shape):
        voxels = check_voxels("synth --shape", shape)
        check_memory(f"synth --shape {' '.join(str(int(v)) for v in shape)}", SYNTH_BYTES_PER_VOXEL * voxels)
    check_output_dir(out_dir, "synth --out")
    start = time.perf_counter()
    grid = grid_for_shape(shape)
    anatomies = {"template": load_anatomy(source, grid.shape)}
    if variant == "out_of_template":
        anatomies["phantom"] = load_anatomy("procedural", grid.shape)
    out = Path(out_dir)
    sections: dict[str, list] = {"training": [], "validation": [], "test": []}
    raw_covariates = []
    indices = range(int(n))
    if progress and n > 1:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synth {kind}", unit="subject")
    for index in indices:
        split = split_of(index, val_fraction, test_fraction)
        family = OUT_OF_TEMPLATE_FAMILIES[index % 3] if variant == "out_of_template" else variant
        anatomy = anatomies["phantom" if family == "phantom" else "template"]
        options = {"skull_strip": skull_strip, "variant": "standard" if family == "phantom" else family}
        if kind == "healthy":
            subject = healthy_subject(anatomy, seed, index, **options)
        elif kind == "brats":
            subject = brats_subject(anatomy, seed, index, **options)
        else:
            lesion_kind = test_lesion_kind(index, val_fraction, test_fraction) if split == "test" else "none"
            subject = anomaly_subject(anatomy, seed, index, lesion_kind, **options)
        paths = []
        for modality, image in subject.images.items():
            path = out / "images" / f"{subject.id}_{modality}.nii.gz"
            save_nifti(image, grid.affine, path, header_extra={"descrip": f"meddiff3d synthetic {kind} {modality}"})
            paths.append(path)
        item = {"id": subject.id, "image": paths if len(paths) > 1 else paths[0]}
        if subject.label is not None and (kind == "brats" or split == "test"):
            item["label"] = save_nifti(subject.label, grid.affine, out / "labels" / f"{subject.id}_seg.nii.gz", dtype=np.uint8)
        item["covariates"] = scale_covariates(subject.covariates_raw)
        raw_covariates.append(subject.covariates_raw)
        item["covariates_raw"] = {k: round(v, 3) for k, v in subject.covariates_raw.items()}
        item.update(subject.extra if kind != "anomaly" or split == "test" else {"lesion_kind": "none"})
        item["acquisition"] = subject.acquisition
        item["index"] = index
        if variant != "standard":
            item["variant"] = family
        sections[split].append(item)
    meta = {
        "name": f"synthetic-{kind}",
        "description": _DESCRIPTIONS[kind],
        "modalities": list(SEQUENCES) if kind == "brats" else ["t1"],
        "covariates": COVARIATE_SCALING,
    }
    if kind == "brats":
        meta.update(label_convention="brats2021", labels=BRATS2021_LABELS)
    elif kind == "anomaly":
        meta.update(labels={"0": "normal", "1": "lesion"}, lesion_kinds=list(TEST_KINDS))
    meta["synthetic"] = {
        "generator": "meddiff3d.data.synthetic", "generator_version": GENERATOR_VERSION, "kind": kind,
        "seed": int(seed), "n": int(n), "source": source,
        "shape": list(grid.shape), "spacing_mm": [round(float(s), 6) for s in grid.spacing], "fov_mm": list(FOV_MM),
        "orientation": "RAS", "skull_stripped": bool(skull_strip), "variant": variant,
        "val_fraction": val_fraction, "test_fraction": test_fraction,
        "covariate_summary": covariate_summary(raw_covariates),
    }
    path = write_datalist(out / "datalist.json", sections, **meta)
    counts = {name: len(items) for name, items in sections.items()}
    return CohortSummary(kind, path, counts, time.perf_counter() - start, meta["synthetic"]["covariate_summary"])


_DESCRIPTIONS = {
    "healthy": "Synthetic healthy T1 brains; age, sex, ventricle enlargement and head size drawn independently (age "
               "also thins the cortex and shrinks the brain); volumes measured on the deformed tissue maps.",
    "brats": "Synthetic BraTS-like gliomas: t1, t1ce, t2, flair with necrotic core, enhancing rim and oedema "
             "(BraTS 2021 labels 1/2/4) and mass effect.",
    "anomaly": "Synthetic anomaly detection set: healthy T1 for training/validation; test T1 with tumour, multifocal "
               "bright, dark lesions or none, each with a binary ground-truth mask.",
}
