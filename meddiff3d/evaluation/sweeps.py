"""Paired covariate sweeps: does the generator change what it is asked to change, and by how much?

Across independent samples, requested and measured volumes can correlate because the covariates move together in
the training data (a model that learnt only age would still "follow" ventricular volume where the two correlate).
A paired sweep removes that: one covariate takes the values ``v_1 < ... < v_m`` while the other covariates and the
seed (so the starting noise) stay fixed, and the measured change is compared with the requested one.

:func:`paired_sweeps` (each covariate in turn, ``S`` seeds):

1. the measurement is calibrated on the datalist's real training volumes, in the model's geometry
   (:func:`~meddiff3d.evaluation.generative.measure_reference`: label-free morphometry ->
   a linear :class:`~.morphometry.Calibration` to the datalist's covariates);
2. for each seed and value one sample is generated (:func:`meddiff3d.pipelines.generation.generate`, seed fixed
   per row) and measured; the change ``measured(v_j) - measured(v_1)`` is paired with ``v_j - v_1``;
3. ``slope`` (least squares through the origin of measured on requested change), ``r`` (Pearson over all pairs
   ``j > 1``, pooled over seeds) and the per-seed slopes are reported, in model units ([0, 1] covariates); a
   generator that follows the request exactly has slope 1 and r 1, one that ignores it slope 0.

The fixed covariates default to the median of the training items' covariates (sex: the more frequent value).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_json

from .morphometry import MEASURED_COVARIATES

logger = logging.getLogger("meddiff3d.evaluation")

__all__ = ["paired_sweeps", "sweep_statistics", "base_covariates"]


def sweep_statistics(requested: Sequence[Sequence[float]], measured: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Slope through the origin, Pearson r and per-row slopes of the changes ``x[:, j] - x[:, 0]`` (rows = seeds)."""
    req, mes = np.asarray(requested, float), np.asarray(measured, float)
    if req.shape != mes.shape or req.ndim != 2 or req.shape[1] < 2:
        raise ValueError(f"need (seeds, values >= 2) arrays of one shape, got {req.shape} and {mes.shape}")
    d_req, d_mes = (req[:, 1:] - req[:, :1]).ravel(), (mes[:, 1:] - mes[:, :1]).ravel()
    keep = np.isfinite(d_mes)
    d_req, d_mes = d_req[keep], d_mes[keep]
    slope = float((d_req * d_mes).sum() / max((d_req * d_req).sum(), 1e-12)) if d_req.size else math.nan
    r = float(np.corrcoef(d_req, d_mes)[0, 1]) if d_req.size > 2 and d_mes.std() > 1e-12 else math.nan
    rows = []
    for a, b in zip(req, mes):
        da, db = a[1:] - a[0], b[1:] - b[0]
        ok = np.isfinite(db)
        rows.append(round(float((da[ok] * db[ok]).sum() / max((da[ok] ** 2).sum(), 1e-12)), 4) if ok.any() else None)
    return {"slope": round(slope, 4), "r": round(r, 4) if math.isfinite(r) else None, "n_pairs": int(d_req.size),
            "slope_per_seed": rows}


def base_covariates(items: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, float]:
    """The median of each covariate over ``items`` (sex, a category: the more frequent value)."""
    out = {}
    for name in names:
        values = np.array([float(it["covariates"][name]) for it in items if name in (it.get("covariates") or {})])
        if not values.size:
            raise InputError(f"no training item has covariate {name!r}: give the fixed covariates explicitly")
        out[name] = float(np.round(values.mean())) if name == "sex" else round(float(np.median(values)), 4)
    return out


def _checked_values(covariate: str, values: Sequence[float]) -> list[float]:
    if covariate not in MEASURED_COVARIATES:
        raise InputError(f"sweep covariate {covariate!r}: only measured ones can be swept "
                         f"({list(MEASURED_COVARIATES)})")
    values = sorted(float(v) for v in values)
    if len(values) < 2 or not all(0.0 <= v <= 1.0 for v in values) or len(set(values)) != len(values):
        raise InputError(f"sweep values {values}: need at least two different values in [0, 1]")
    return values


def paired_sweeps(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike, datalist: str | os.PathLike,
                  out_dir: str | os.PathLike, sweeps: Mapping[str, Sequence[float]], *,
                  seeds: Sequence[int] = (0, 1, 2), fixed: Mapping[str, float] | None = None,
                  steps: int | None = None, sampler: str | None = None, guidance_scale: float = 1.0,
                  max_real: int | None = 64, device: str = "auto", amp: str = "auto") -> dict[str, dict[str, Any]]:
    """Sweep each covariate of ``sweeps`` (``{name: values}``) over its values for each seed (module docstring);
    every sweep is checked before the real volumes are measured (once, for all sweeps). Writes
    ``out_dir/sweep_<covariate>.json`` and the samples under ``out_dir/<covariate>/``; returns ``{covariate:
    result}``."""
    import nibabel as nib

    from meddiff3d.data.datalist import load_datalist, read_datalist
    from meddiff3d.engine.checkpoint import read_file
    from meddiff3d.pipelines.generation import generate

    from .generative import measure_reference
    from .morphometry import measure_volumes, to_model_scale
    from .similarity import ms_ssim_config

    sweeps = {covariate: _checked_values(covariate, values) for covariate, values in sweeps.items()}
    meta = read_file(diffusion_path, what="diffusion model file")["meta"]
    image_meta, names = meta["image"], list(meta["conditioning"]["covariates"])
    scaling = read_datalist(datalist).get("covariates") or meta["conditioning"].get("scaling") or {}
    base = dict(fixed) if fixed is not None else base_covariates(load_datalist(datalist, "training",
                                                                               check_images=False), names)
    for covariate in sweeps:
        if set(base) - set(names) or set(names) - set(base) - {covariate}:
            raise InputError(f"fixed covariates {sorted(base)} do not match the model's {names}")
    reference = measure_reference(datalist, image_meta, scaling, max_real, ms_ssim_config(image_meta["shape"]))
    calib = reference.calibration
    out = Path(out_dir)
    results = {}
    for covariate, values in sweeps.items():
        start = time.perf_counter()
        requested, measured, samples = [], [], []
        for seed in seeds:
            row_mes = []
            for value in values:
                (path,) = generate(codec_path, diffusion_path, covariates={**base, covariate: value}, num_samples=1,
                                   seed=int(seed), steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                                   output_dir=out / covariate / f"{covariate}_{value:g}", device=device, amp=amp,
                                   progress=False)
                volume = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)
                raw = measure_volumes(volume, image_meta["spacing"], atlas=reference.atlas)
                value_measured = calib(to_model_scale(raw, scaling)).get(covariate, math.nan)
                row_mes.append(value_measured)
                samples.append({"seed": int(seed), "requested": value, "measured": round(value_measured, 4),
                                "raw_ml": {k: round(float(v), 2) for k, v in raw.items() if k.endswith("_ml")},
                                "file": str(path)})
            requested.append(values)
            measured.append(row_mes)
            logger.info("sweep %s seed %d: requested %s -> measured %s", covariate, seed, values,
                        [round(v, 3) for v in row_mes])
        results[covariate] = {
            "covariate": covariate, "values": values, "seeds": [int(s) for s in seeds], "fixed": base,
            "statistics": sweep_statistics(requested, measured),
            "measurement": {"atlas": reference.atlas, "calibration": calib.to_dict(), "ceiling": reference.ceiling},
            "generation": {"steps": steps, "sampler": sampler, "guidance_scale": guidance_scale},
            "samples": samples,
            "seconds": round(time.perf_counter() - start, 1)}
        save_json(results[covariate], out / f"sweep_{covariate}.json")
    return results
