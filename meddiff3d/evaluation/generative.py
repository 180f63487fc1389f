"""Evaluation of a trained covariate-conditioned T1 generator (``brain_mri_ldm``) against its datalist.

:func:`evaluate` runs four checks and writes ``OUT/evaluation.json`` (atomic) and ``OUT/samples.csv``:

1. **Measurement ceiling** -- :func:`~meddiff3d.evaluation.morphometry.measure_volumes` on the real training volumes
   (loaded with the model's own preprocessing: RAS, spacing, percentile scaling, pad/crop) against their datalist
   covariates: Pearson ``r`` and MAE in model units, after a linear :class:`~.morphometry.Calibration` fitted on the
   training volumes (in-sample) and on the held-out (validation + test) volumes (out-of-sample).
2. **Conditioning fidelity** -- ``K`` covariate vectors of held-out items (spread over their ventricular-volume
   range), ``n`` samples each; requested vs measured (calibrated) ventricular / brain volume: ``r`` and MAE over the
   samples. Unconditional samples (same count; skipped for models trained without conditioning dropout) are compared
   with the dataset distribution (mean / std) and, as a chance baseline, paired with the same requests.
3. **Diversity and realism** -- MS-SSIM (:mod:`.similarity`) over sample pairs (all; within one condition) and over
   training pairs (reference); Fréchet distances (:mod:`.features`) on the fixed random CNN and on hand-crafted
   features, generated vs held-out real, with training vs held-out real as the floor. Features are standardised by
   the training set's per-feature mean and std before the distance.
4. **Memorisation** -- each sample's nearest training subject by Pearson correlation of downsampled volumes
   (:func:`~.similarity.nearest_neighbours`); the threshold is the largest nearest-training-neighbour correlation of
   a held-out real subject, so an independent subject from the data distribution exceeds it with probability about
   ``1 / (n_held_out + 1)``; samples above it are flagged as near-copies.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_json

from .features import RandomConvFeatures, frechet_distance, handcrafted_features
from .generative_report import summary_table, write_samples_csv
from .morphometry import MEASURED_COVARIATES, atlas_for, calibrate, measure_volumes, to_model_scale
from .similarity import _prepare, ms_ssim_config, nearest_neighbours, nn_vector, pair_indices, pairwise_ms_ssim

logger = logging.getLogger("meddiff3d.evaluation")

__all__ = ["evaluate", "RealReference", "measure_reference", "VolumeRecord", "describe_volume", "agreement",
           "memorisation", "load_real_volumes"]


@dataclass
class VolumeRecord:
    """What the evaluation keeps of one volume (the volume itself only downsampled, for MS-SSIM)."""

    name: str
    raw: dict[str, Any]  # measure_volumes output (mL)
    measured: dict[str, float]  # model scale, uncalibrated
    cnn: np.ndarray
    hand: np.ndarray
    nn: np.ndarray
    small: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)


def describe_volume(volume: np.ndarray, name: str, spacing: Sequence[float], scaling: Mapping[str, Any],
                    net: RandomConvFeatures, ssim_factor: int | None, info: Mapping[str, Any] | None = None,
                    atlas: str = "mni") -> VolumeRecord:
    volume = np.asarray(volume, dtype=np.float32).reshape(np.shape(volume)[-3:])
    raw = measure_volumes(volume, spacing, atlas=atlas)
    small = None if ssim_factor is None else _prepare(volume, ssim_factor)[0, 0].numpy()
    return VolumeRecord(name, raw, to_model_scale(raw, scaling), net.features(volume),
                        handcrafted_features(volume, raw), nn_vector(volume), small, dict(info or {}))


def load_real_volumes(datalist: str | os.PathLike, sections: Sequence[str], image_meta: Mapping[str, Any],
                      max_items: int | None):
    """Yield ``(section, item, volume)`` for the datalist's items in the model's geometry and intensity scale."""
    from meddiff3d.data.datalist import load_datalist, read_datalist
    from meddiff3d.data.transforms import t1_brain_transforms

    doc = read_datalist(datalist)
    transform = t1_brain_transforms(spacing=image_meta["spacing"], shape=image_meta["shape"], train=False)
    for section in sections:
        if not doc.get(section):
            continue
        items = load_datalist(datalist, section, check_images=False)
        for item in items[:max_items]:
            volume = transform({"image": item["image"]})["image"]
            yield section, item, np.asarray(volume)[0]


def _stats(values: Sequence[float]) -> dict[str, float | int | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if not v.size:
        return {"n": 0, "mean": None, "std": None}
    return {"n": int(v.size), "mean": round(float(v.mean()), 4), "std": round(float(v.std()), 4)}


def agreement(requested: Sequence[float], measured: Sequence[float]) -> dict[str, Any]:
    """Pearson r and mean absolute error between paired values (``r`` is ``None`` without spread)."""
    pairs = np.asarray([(a, b) for a, b in zip(requested, measured) if math.isfinite(a) and math.isfinite(b)], float)
    if not len(pairs):
        return {"n": 0, "r": None, "mae": None}
    r = None
    if len(pairs) > 2 and pairs[:, 0].std() > 1e-9 and pairs[:, 1].std() > 1e-9:
        r = round(float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]), 4)
    return {"n": int(len(pairs)), "r": r, "mae": round(float(np.abs(pairs[:, 0] - pairs[:, 1]).mean()), 4)}


def memorisation(samples: np.ndarray, train: np.ndarray, held_out: np.ndarray) -> dict[str, Any]:
    """Nearest-training-neighbour correlation of samples and of held-out real volumes (rows of
    :func:`~.similarity.nn_vector`); threshold = the held-out maximum; returns indices, similarities and flags."""
    idx, sim = nearest_neighbours(samples, train) if len(samples) else (np.zeros(0, int), np.zeros(0))
    _, real_sim = nearest_neighbours(held_out, train) if len(held_out) else (None, np.zeros(0))
    threshold = float(real_sim.max()) if len(real_sim) else 1.0 - 1e-6
    return {"index": idx, "similarity": sim, "flag": sim > threshold, "threshold": threshold,
            "held_out_similarity": real_sim}


def _standardise(reference: np.ndarray, *sets: np.ndarray) -> list[np.ndarray]:
    mean, std = reference.mean(0), reference.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(s - mean) / std for s in sets]


def _fd(name_sets: Mapping[str, tuple[np.ndarray, np.ndarray]], reference: np.ndarray) -> dict[str, Any]:
    out = {}
    for name, (a, b) in name_sets.items():
        if len(a) < 2 or len(b) < 2:
            out[name] = None
            continue
        sa, sb = _standardise(reference, a, b)
        out[name] = {"fd": round(frechet_distance(sa, sb), 4), "n": [int(len(a)), int(len(b))]}
    return out


def _pick_conditions(items: Sequence[Mapping[str, Any]], k: int) -> list[Mapping[str, Any]]:
    """``k`` held-out items spread evenly over the ventricular-volume order (deterministic)."""
    items = sorted(items, key=lambda it: (it["covariates"].get("ventricular_volume", 0.0), str(it.get("id"))))
    if k >= len(items):
        return list(items)
    return [items[int(round(i))] for i in np.linspace(0, len(items) - 1, k)]


@dataclass
class RealReference:
    """The real volumes' side of :func:`evaluate`, measured once per datalist: records, datalist truth, the
    measurement calibration (fitted on the training volumes) and its ceiling."""

    key: dict[str, Any]
    net: RandomConvFeatures
    real: dict[str, list[VolumeRecord]]
    truth: dict[str, list[dict]]
    held_items: list[dict]
    calibration: Any
    ceiling: dict[str, Any]
    atlas: str = "mni"  # the morphometry atlas of the datalist (morphometry.atlas_for): samples are measured with it


#: bumped when measure_volumes changes, so that a saved reference of an older measurement is not reused
MEASUREMENT_VERSION = 2  # 2: atlas-weighted ventricles (2026-12-03)


def _reference_key(datalist, image_meta, scaling, ssim_cfg, max_real) -> dict[str, Any]:
    return {"datalist": str(Path(datalist).resolve()), "mtime": Path(datalist).stat().st_mtime_ns,
            "measurement_version": MEASUREMENT_VERSION,
            "spacing": list(image_meta["spacing"]), "shape": list(image_meta["shape"]), "scaling": dict(scaling),
            "ssim": dict(ssim_cfg), "max_real": max_real}


def measure_reference(datalist: str | os.PathLike, image_meta: Mapping[str, Any], scaling: Mapping[str, Any],
                      max_real: int | None, ssim_cfg: Mapping[str, Any]) -> RealReference:
    """Load and measure the datalist's real volumes in the model's geometry (training vs held-out: validation +
    test), fit the measurement calibration on the training volumes, and its ceiling per group."""
    from meddiff3d.data.datalist import read_datalist

    doc = read_datalist(datalist)
    net = RandomConvFeatures()
    spacing = image_meta["spacing"]
    # ---- real volumes
    real: dict[str, list[VolumeRecord]] = {"training": [], "held_out": []}
    truth: dict[str, list[dict]] = {"training": [], "held_out": []}
    held_items: list[dict] = []
    for section, item, volume in load_real_volumes(datalist, ("training", "validation", "test"), image_meta,
                                                   max_real):
        group = "training" if section == "training" else "held_out"
        keep_small = group == "training" and len(real["training"]) < 16
        real[group].append(describe_volume(volume, str(item.get("id")), spacing, scaling, net,
                                           ssim_factor=ssim_cfg["downsample"] if keep_small else None,
                                           info={"section": section}, atlas=atlas_for(doc, item)))
        truth[group].append(dict(item.get("covariates") or {}))
        if group == "held_out":
            held_items.append(item)
    if len(real["training"]) < 3:
        raise InputError(f"datalist {datalist}: need at least 3 training items to calibrate the measurement")
    logger.info("measured %d training + %d held-out real volumes", len(real["training"]), len(real["held_out"]))
    calib = calibrate([r.measured for r in real["training"]], truth["training"])
    ceiling = {}
    for group in ("training", "held_out"):
        ceiling[group] = {name: agreement([t.get(name, math.nan) for t in truth[group]],
                                          [calib(r.measured).get(name, math.nan) for r in real[group]])
                          for name in MEASURED_COVARIATES}
    return RealReference(_reference_key(datalist, image_meta, scaling, ssim_cfg, max_real), net, real, truth,
                         held_items, calib, ceiling, atlas_for(doc))


def evaluate(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike, datalist: str | os.PathLike,
             out_dir: str | os.PathLike, *, n_per_condition: int = 4, conditions: int = 8, steps: int = 20,
             sampler: str = "dpmpp_2m", guidance_scale: float = 1.0, seed: int = 0, unconditional: bool = True,
             timestep_spacing: str | None = None,
             max_real: int | None = 64, max_pairs: int = 24, ssim_max_side: int = 128, device: str = "auto",
             amp: str = "auto", progress: bool = False, cache: dict | None = None) -> dict[str, Any]:
    """Run the evaluation of the module docstring; returns the dict also written to ``out_dir/evaluation.json``.

    Args:
        n_per_condition, conditions: ``n`` samples for each of ``K`` held-out covariate vectors (and ``K * n``
            unconditional samples when ``unconditional`` and the model supports it).
        steps, sampler, timestep_spacing, guidance_scale, seed: generation settings
            (:func:`meddiff3d.pipelines.generation.generate`; ``timestep_spacing`` None: the sampler's default);
            condition ``k`` uses seeds ``seed + 1000 k ...``, unconditional samples ``seed + 100000 ...``.
        max_real: at most this many items per datalist section are loaded (``None``: all).
        max_pairs: at most this many pairs per MS-SSIM comparison (a seeded subset).
        ssim_max_side: volumes are average-pooled by a power of 2 until no side exceeds this before MS-SSIM
            (3D MS-SSIM at 160 x 224 x 160 costs over a minute per pair on a CPU).
        cache: a dict kept between calls: the real volumes' measurements (:class:`RealReference`) are stored in it
            and reused by a later call with the same datalist, geometry and settings (a sweep over samplers and
            seeds measures the real volumes once).
    """
    from meddiff3d.data.datalist import read_datalist
    from meddiff3d.engine.checkpoint import kind_of, read_file
    from meddiff3d.pipelines.generation import generate

    start = time.perf_counter()
    out = Path(out_dir)
    for what, path in (("codec", codec_path), ("diffusion model", diffusion_path), ("datalist", datalist)):
        if not Path(path).is_file():
            raise InputError(f"{what} file {path} does not exist")
    if int(n_per_condition) < 2 or int(conditions) < 1:
        raise InputError("need n_per_condition >= 2 (diversity pairs) and conditions >= 1")
    data = read_file(diffusion_path, what="diffusion model file")  # its meta only: generate() loads the model
    if kind_of(data) != "latent_diffusion":
        raise InputError(f"{diffusion_path} is not a latent diffusion model")
    meta = data["meta"]
    del data
    image_meta, cond_meta = meta["image"], meta["conditioning"]
    names = list(cond_meta["covariates"])
    doc = read_datalist(datalist)
    scaling = doc.get("covariates") or cond_meta.get("scaling") or {}
    missing = [n for n in MEASURED_COVARIATES if n not in scaling or "min" not in scaling[n]]
    if missing:
        raise InputError(f"datalist {datalist} has no min/max scaling for {missing} in its 'covariates' block")
    spacing, shape = image_meta["spacing"], image_meta["shape"]
    factor = 1
    while max(shape) / factor > ssim_max_side:
        factor *= 2
    ssim_cfg = ms_ssim_config([s // factor for s in shape])
    ssim_cfg["downsample"] = factor * ssim_cfg["downsample"]
    key = json.dumps(_reference_key(datalist, image_meta, scaling, ssim_cfg, max_real), sort_keys=True)
    reference = (cache or {}).get(key) or measure_reference(datalist, image_meta, scaling, max_real, ssim_cfg)
    if cache is not None:
        cache[key] = reference
    net, real, truth, held_items, calib = (reference.net, reference.real, reference.truth, reference.held_items,
                                           reference.calibration)

    # ---- generation
    conditional_ok = cond_meta["mode"] != "none"
    uncond_ok = unconditional and ((meta.get("training") or {}).get("cond_dropout", None) != 0
                                   or cond_meta["mode"] == "none")
    if conditional_ok and not any(it.get("covariates") for it in held_items):
        raise InputError(f"datalist {datalist} has no validation/test items with covariates to draw conditions from")
    with_cov = [it for it in held_items if it.get("covariates")]
    picked = _pick_conditions(with_cov, int(conditions)) if conditional_ok else []
    settings = {"sampler": sampler, "steps": int(steps), "spacing": timestep_spacing,
                "guidance_scale": float(guidance_scale),
                "seed": int(seed), "device": device, "amp": amp}
    samples: list[VolumeRecord] = []
    for k, item in enumerate(picked):
        request = {n: float(item["covariates"][n]) for n in names}
        paths = generate(codec_path, diffusion_path, covariates=request, num_samples=int(n_per_condition),
                         output_dir=out / "samples" / f"condition{k:02d}", seed=int(seed) + 1000 * k,
                         progress=progress, **{k2: v for k2, v in settings.items() if k2 != "seed"})
        for i, path in enumerate(paths):
            samples.append(_load_sample(path, spacing, scaling, net, ssim_cfg["downsample"],
                                        {"kind": "conditional", "condition": k, "source_id": item.get("id"),
                                         "seed": int(seed) + 1000 * k + i, "requested": request}, reference.atlas))
        logger.info("condition %d/%d done", k + 1, len(picked))
    n_uncond = int(n_per_condition) * max(len(picked), 1)
    if uncond_ok:
        paths = generate(codec_path, diffusion_path, covariates=None, num_samples=n_uncond,
                         output_dir=out / "samples" / "unconditional", seed=int(seed) + 100000, progress=progress,
                         **{k2: v for k2, v in settings.items() if k2 not in ("seed", "guidance_scale")})
        for i, path in enumerate(paths):
            samples.append(_load_sample(path, spacing, scaling, net, ssim_cfg["downsample"],
                                        {"kind": "unconditional", "condition": None, "seed": int(seed) + 100000 + i,
                                         "requested": None}, reference.atlas))
    cond = [s for s in samples if s.info["kind"] == "conditional"]
    uncond = [s for s in samples if s.info["kind"] == "unconditional"]
    for s in samples:
        s.info["calibrated"] = calib(s.measured)

    # ---- 1. conditioning fidelity
    fidelity: dict[str, Any] = {"conditional": {}, "unconditional": {}}
    for name in MEASURED_COVARIATES:
        fidelity["conditional"][name] = agreement([s.info["requested"][name] for s in cond],
                                                  [s.info["calibrated"].get(name, math.nan) for s in cond])
        # chance baseline: unconditional sample j paired with the request of conditional sample j
        fidelity["unconditional"][name] = {
            "measured": _stats([s.info["calibrated"].get(name, math.nan) for s in uncond]),
            "dataset": _stats([t[name] for t in truth["training"] if name in t]),
            "paired_with_requests": agreement([c.info["requested"][name] for c in cond],
                                              [u.info["calibrated"].get(name, math.nan) for u in uncond]),
        }
    fidelity["conditional_measured"] = {name: _stats([s.info["calibrated"].get(name, math.nan) for s in cond])
                                        for name in MEASURED_COVARIATES}
    fidelity["invalid_measurements"] = int(sum(not s.raw.get("valid", False) for s in samples))

    # ---- 2. diversity (MS-SSIM) and realism (FD)
    groups = [s.info["condition"] if s.info["condition"] is not None else -1 for s in samples]
    gen_small = [s.small for s in samples]
    diversity = {"config": ssim_cfg}
    for label, pairs, vols in (
        ("generated_all_pairs", pair_indices(groups, max_pairs, None, seed), gen_small),
        ("generated_within_condition", pair_indices([g if g >= 0 else -1 - i for i, g in enumerate(groups)],
                                                    max_pairs, True, seed), gen_small),
        ("training_pairs", pair_indices([0] * sum(r.small is not None for r in real["training"]), max_pairs, None,
                                        seed), [r.small for r in real["training"] if r.small is not None]),
    ):
        # the kept volumes are already pooled by ssim_cfg["downsample"]: compare them as they are
        diversity[label] = _stats(pairwise_ms_ssim(vols, pairs, {**ssim_cfg, "downsample": 1}))
    train_cnn = np.stack([r.cnn for r in real["training"]])
    train_hand = np.stack([r.hand for r in real["training"]])

    def feats(records, kind):
        return np.stack([getattr(r, kind) for r in records]) if records else np.zeros((0, 1))

    realism: dict[str, Any] = {"feature_network": net.describe(), "standardised_by": "training features"}
    for kind, ref in (("cnn", train_cnn), ("hand", train_hand)):
        held = feats(real["held_out"], kind)
        realism[f"fd_{'random_cnn' if kind == 'cnn' else 'handcrafted'}"] = _fd({
            "generated_vs_held_out": (feats(samples, kind), held),
            "conditional_vs_held_out": (feats(cond, kind), held),
            "unconditional_vs_held_out": (feats(uncond, kind), held),
            "training_vs_held_out_floor": (ref, held),
        }, ref)

    # ---- 3. memorisation
    mem = memorisation(feats(samples, "nn"), feats(real["training"], "nn"), feats(real["held_out"], "nn"))
    for s, i, sim, flag in zip(samples, mem["index"], mem["similarity"], mem["flag"]):
        s.info.update(nn_train_id=real["training"][int(i)].name, nn_similarity=float(sim), near_copy=bool(flag))
    memo = {"method": "Pearson correlation of volumes average-pooled to <= 48 voxels per side",
            "threshold": round(mem["threshold"], 6), "held_out_nn_similarity": _stats(mem["held_out_similarity"]),
            "sample_nn_similarity": _stats(mem["similarity"]), "n_flagged": int(mem["flag"].sum()),
            "flagged": [s.name for s in samples if s.info.get("near_copy")],
            "false_positive_rate_per_independent_sample": round(1.0 / (len(real["held_out"]) + 1), 4)}

    result = {
        "models": {"codec": str(codec_path), "diffusion": str(diffusion_path)}, "datalist": str(datalist),
        "settings": {**settings, "n_per_condition": int(n_per_condition), "conditions": len(picked),
                     "unconditional_samples": len(uncond),
                     "unconditional_skipped": None if uncond_ok else "model trained without conditioning dropout"
                     if unconditional else "not requested", "max_real": max_real, "max_pairs": max_pairs},
        "measurement": {"method": "meddiff3d.evaluation.morphometry.measure_volumes", "atlas": reference.atlas,
                        "calibration": calib.to_dict(),
                        "ceiling_training_in_sample": reference.ceiling["training"],
                        "ceiling_held_out": reference.ceiling["held_out"],
                        "n_real": {k: len(v) for k, v in real.items()}},
        "conditioning": fidelity, "diversity_ms_ssim": diversity, "realism": realism, "memorisation": memo,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    save_json(result, out / "evaluation.json")
    write_samples_csv(samples, names, out / "samples.csv")
    logger.info("generative evaluation of %d sample(s) in %.1f s:\n%s\nwrote %s, %s", len(samples), result["seconds"],
                summary_table(result), out / "evaluation.json", out / "samples.csv")
    return result


def _load_sample(path: Path, spacing, scaling, net, factor, info, atlas) -> VolumeRecord:
    import nibabel as nib

    volume = np.asarray(nib.load(str(path)).get_fdata(), dtype=np.float32)
    return describe_volume(volume, Path(path).name, spacing, scaling, net, factor, info, atlas)
