"""Evaluation of calibrated anomaly detectors on a labelled test split, several detectors side by side.

``evaluate_anomaly(codec, diffusion, {"diffusion": cal.json, "autoencoder": cal_ae.json}, datalist, out)`` runs each
detector on every case of ``datalist[section]`` and compares its anomaly map, on the model grid, with the case's
ground-truth mask (``label``; a case without one, or with an empty one, is healthy). Voxels evaluated: the brain
mask of the detector plus the lesion. Reported per detector:

* per volume (``per_volume.csv``): Dice at the calibrated threshold, best-possible Dice (threshold sweep), AUPRC,
  voxel AUROC, the share of normal voxels flagged, the volume score (mean of the top 1% anomaly scores);
* overall and per lesion kind (``summary.csv``, ``metrics.json``): the same voxel metrics pooled over all volumes
  (:class:`~meddiff3d.evaluation.anomaly_metrics.ScoreHistogram`), the mean of the per-volume Dice, and the
  volume-level detection AUROC of lesioned vs healthy volumes from the volume scores.

Benchmarks show voxel AUROC is almost always >= 0.9 and cannot rank methods; Dice at the threshold fixed on healthy
data, best Dice and AUPRC can.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.errors import InputError
from meddiff3d.utils.io import atomic_path, save_json

from .anomaly_metrics import ScoreHistogram, average_precision, best_dice, dice, roc_auc

logger = logging.getLogger("meddiff3d.evaluation")

__all__ = ["evaluate_anomaly", "case_metrics", "volume_level_auroc", "PER_VOLUME_FIELDS", "SUMMARY_FIELDS"]

PER_VOLUME_FIELDS = ["method", "id", "lesion_kind", "variant", "lesion_voxels", "dice", "best_dice", "auprc", "auroc",
                     "flagged_normal_fraction", "volume_score", "seconds"]
SUMMARY_FIELDS = ["method", "lesion_kind", "volumes", "dice_mean", "dice", "best_dice", "auprc", "auroc",
                  "volume_auroc"]
HEALTHY = "none"


def case_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Voxel metrics of one volume (evaluated voxels only); Dice, best Dice, AUPRC and AUROC are nan without
    lesion."""
    scores, labels = np.asarray(scores, dtype=np.float64).ravel(), np.asarray(labels).ravel().astype(bool)
    flagged = scores > threshold
    lesion = int(labels.sum())
    out: dict[str, float | int] = {"lesion_voxels": lesion,
                                   "flagged_normal_fraction": float(flagged[~labels].mean()) if (~labels).any() else 0.0}
    if lesion:
        out.update(dice=dice(flagged, labels), best_dice=best_dice(scores, labels)[0],
                   auprc=average_precision(scores, labels), auroc=roc_auc(scores, labels))
    else:
        out.update(dice=float("nan"), best_dice=float("nan"), auprc=float("nan"), auroc=float("nan"))
    return out


def volume_level_auroc(rows: Sequence[Mapping[str, Any]], kind: str | None = None) -> float:
    """AUROC of the volume scores: lesioned volumes (of ``kind``, or all) against healthy ones."""
    chosen = [r for r in rows if r["lesion_kind"] == HEALTHY or kind is None or r["lesion_kind"] == kind]
    return roc_auc([r["volume_score"] for r in chosen], [r["lesion_kind"] != HEALTHY for r in chosen])


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _write_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], path: Path) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if _clean(row.get(k)) is None else _round(row.get(k))) for k in fields})
    return path


def _round(value: Any) -> Any:
    return round(value, 6) if isinstance(value, float) else value


def _fmt(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{float(value):.3f}"


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _lesion_kind(item: Mapping[str, Any], lesion_voxels: int) -> str:
    if lesion_voxels == 0:
        return HEALTHY
    kind = item.get("lesion_kind")
    return str(kind) if kind not in (None, "", HEALTHY) else "lesion"


def evaluate_anomaly(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike | None,
                     calibrations: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
                     datalist: str | os.PathLike, output_dir: str | os.PathLike, *, section: str = "test",
                     max_volumes: int | None = None, device: str = "auto", amp: str = "auto",
                     decode_split: int | None = None, check_models: bool = True,
                     progress: bool = True) -> dict[str, Any]:
    """Evaluate each calibrated detector on ``datalist[section]``; writes ``per_volume.csv``, ``summary.csv`` and
    ``metrics.json`` to ``output_dir`` and returns the metrics dict. ``calibrations`` maps a method name to its
    calibration file (a list uses each file's detection method as the name)."""
    from meddiff3d.anomaly.calibration import load_calibration
    from meddiff3d.anomaly.healing import load_anomaly_models
    from meddiff3d.pipelines.anomaly import Detector, check_calibrated_models, progress_steps, resolve_inputs

    start = time.perf_counter()
    if not isinstance(calibrations, Mapping):
        loaded = [load_calibration(p) for p in calibrations]
        calibrations = {c.settings.method: p for c, p in zip(loaded, calibrations)}
    if not calibrations:
        raise InputError("no calibration files given to evaluate")
    items = resolve_inputs(datalist, section)
    if max_volumes is not None:
        items = items[: max(1, int(max_volumes))]
    detectors = {}
    for name, path in calibrations.items():  # every check before the (long) evaluation starts
        cal = load_calibration(path)
        diffusion = diffusion_path if cal.settings.uses_diffusion else None
        if check_models:
            check_calibrated_models(cal, codec_path, diffusion, str(path))
        models = load_anomaly_models(codec_path, diffusion, device=device, amp=amp, decode_split=decode_split)
        detectors[name] = Detector(models, cal.settings, cal)

    rows: list[dict[str, Any]] = []
    histograms: dict[tuple[str, str], ScoreHistogram] = {}
    steps = sum(d.steps for d in detectors.values())  # one bar over every denoiser step of every detector
    for item, callback in progress_steps(items, f"evaluating {len(detectors)} detector(s)", progress, steps):
        for name, detector in detectors.items():
            result = detector(item, callback=callback)
            label = result.data.get("label")
            lesion = (np.asarray(label[0]) > 0.5) if label is not None else np.zeros(result.x.shape[2:], bool)
            region = (result.brain[0, 0].cpu().numpy() > 0) | lesion
            scores, labels = result.score[0, 0].cpu().numpy()[region], lesion[region]
            threshold = detector.calibration.threshold
            row = {"method": name, "id": str(item["id"]), **case_metrics(scores, labels, threshold),
                   "volume_score": result.volume_score, "seconds": round(result.seconds, 3)}
            row["lesion_kind"] = _lesion_kind(item, row["lesion_voxels"])
            row["variant"] = str(item.get("variant", "standard"))  # synth --variant out_of_template families
            rows.append(row)
            for kind in ("all", row["lesion_kind"], f"variant:{row['variant']}"):
                key = (name, kind)
                if key not in histograms:
                    histograms[key] = ScoreHistogram(threshold=threshold)
                histograms[key].add(scores, labels)

    summary = []
    by_method: dict[str, dict[str, Any]] = defaultdict(dict)
    kinds = ["all"] + sorted({r["lesion_kind"] for r in rows} - {HEALTHY}) + ([HEALTHY] if any(
        r["lesion_kind"] == HEALTHY for r in rows) else [])
    for name in detectors:
        method_rows = [r for r in rows if r["method"] == name]
        for kind in kinds:
            chosen = [r for r in method_rows if kind == "all" or r["lesion_kind"] == kind]
            if not chosen:
                continue
            pooled = histograms[(name, kind)].metrics()
            entry = {"method": name, "lesion_kind": kind, "volumes": len(chosen),
                     "dice_mean": _nanmean([r["dice"] for r in chosen]), "dice": pooled.get("dice", float("nan")),
                     "best_dice": pooled["best_dice"], "auprc": pooled["auprc"], "auroc": pooled["auroc"],
                     "volume_auroc": volume_level_auroc(method_rows, None if kind == "all" else kind)
                     if kind != HEALTHY else float("nan"),
                     "flagged_normal_fraction": _nanmean([r["flagged_normal_fraction"] for r in chosen]),
                     "best_threshold": pooled["best_threshold"]}
            summary.append(entry)
            by_method[name][kind] = entry
    by_variant: dict[str, dict[str, Any]] = defaultdict(dict)
    for name in detectors:
        for variant in sorted({r["variant"] for r in rows}):
            chosen = [r for r in rows if r["method"] == name and r["variant"] == variant]
            pooled = histograms[(name, f"variant:{variant}")].metrics()
            healthy = [r["flagged_normal_fraction"] for r in chosen if r["lesion_kind"] == HEALTHY]
            by_variant[name][variant] = {
                "volumes": len(chosen), **{k: pooled.get(k, float("nan")) for k in ("dice", "best_dice", "auprc",
                                                                                    "auroc")},
                "healthy_volumes": len(healthy), "healthy_flagged_fraction": _nanmean(healthy),
                "flagged_normal_fraction": _nanmean([r["flagged_normal_fraction"] for r in chosen])}
    out = Path(output_dir)
    _write_csv(rows, PER_VOLUME_FIELDS, out / "per_volume.csv")
    _write_csv(summary, SUMMARY_FIELDS, out / "summary.csv")
    metrics = {"datalist": str(Path(datalist).absolute()), "section": section, "volumes": len(items),
               "calibrations": {k: str(v) for k, v in calibrations.items()},
               "thresholds": {k: d.calibration.threshold for k, d in detectors.items()},
               "methods": by_method, "by_variant": by_variant, "per_volume": rows,
               "seconds": round(time.perf_counter() - start, 2)}
    metrics = _clean(metrics)
    save_json(metrics, out / "metrics.json")
    headline = "; ".join(
        f"{name}: Dice {_fmt(entry['dice'])}, best Dice {_fmt(entry['best_dice'])}, AUPRC {_fmt(entry['auprc'])}, "
        f"AUROC {_fmt(entry['auroc'])}, volume AUROC {_fmt(entry['volume_auroc'])}"
        for name, kinds_of in by_method.items() for kind, entry in kinds_of.items() if kind == "all")
    logger.info("anomaly evaluation of %d volume(s) x %d detector(s) in %.1f s: %s; wrote %s, %s, %s", len(items),
                len(detectors), metrics["seconds"], headline, out / "metrics.json", out / "summary.csv",
                out / "per_volume.csv")
    return metrics
