"""Evaluation of BraTS segmentations per region (WT, TC, ET): overlap, boundary distance, and whether the model's
uncertainty points at its errors.

Prediction folder contract (what every BraTS segmentation inference in meddiff3d writes), for a case ``<id>``::

    PRED_DIR/<id>/<id>_seg.nii.gz        uint8 BraTS label map (0/1/2/4, or 0/1/2/3 for brats2023) on the input grid
    PRED_DIR/<id>/<id>_prob.nii.gz       optional, float32 probability per region WT, TC, ET: NIfTI vectors
                                         (X, Y, Z, 1, 3) (utils.io.save_vector_nifti) or channel-last (X, Y, Z, 3)
    PRED_DIR/<id>/<id>_variance.nii.gz   optional, same layout: per-region variance across an ensemble
    PRED_DIR/<id>/<id>_entropy.nii.gz    optional, same layout: per-region entropy

Every file must have the shape and affine (within 1e-3 mm) of the case's ground-truth ``label``; anything else is an
:class:`~meddiff3d.errors.InputError` naming the file.

Metrics per case and region (:func:`region_metrics`), regions from :func:`meddiff3d.data.brats.region_masks`:

``dice``
    :func:`meddiff3d.evaluation.anomaly_metrics.dice` (the package's one Dice, exact integer counts). Both masks
    empty -> 1 (a correct "no tumour"); exactly one empty -> 0.
``hd95`` (mm)
    MONAI ``compute_hausdorff_distance(percentile=95)`` with the voxel spacing of the label's affine: the larger of
    the two directed 95th percentiles of the distances between the masks' surface voxels. Both empty -> 0; exactly
    one empty -> ``empty_hd95``: ``"diagonal"`` (default) = the diagonal of the image in mm, the largest distance
    possible inside it (BraTS uses 373.13 mm, the diagonal of 240x240x155 at 1 mm); ``"nan"`` leaves the case out
    of the statistics (the summary's ``n`` counts the cases kept); or a number in mm.
``pred_ml``, ``true_ml``
    volumes of the predicted and true region.
``ece`` (needs ``_prob``)
    expected calibration error of the region probability over the domain voxels: ``sum_b n_b / N * |mean(y) -
    mean(p)|`` over ``bins`` equal-width bins of ``p`` (``p = 1`` falls in the last bin).
``prob_healthy`` (needs ``_prob``)
    the mean region probability over the tumour-free domain voxels (near 0 if calibrated; NaN if there are none).
``err_top{k}_{source}`` (needs an uncertainty map)
    the share of the misclassified voxels (prediction != truth for this region) that lie in the top-``k`` % most
    uncertain voxels. ``source`` is ``variance`` or ``entropy`` (the files) or ``pentropy``, the binary entropy
    ``H(p)`` of ``_prob`` (so a deterministic model's own confidence is scored the same way). The top region holds
    the ``ceil(k/100 * N)`` domain voxels of largest uncertainty; ties at the threshold are all included and voxels
    of zero uncertainty never are. ``err_top{k}_{source}_frac`` is that region's share of the domain: what a
    random uncertainty map would capture (the chance level). No misclassified voxel -> NaN.

The domain is the brain: voxels where any input sequence is non-zero (BraTS volumes are skull-stripped), or the
whole volume with ``domain="volume"`` (also the fallback when the images are all zero).

The ECE is hand-written: MONAI 1.6's ``CalibrationErrorMetric`` (float32 ``linspace(0, 1 + eps)`` edges) puts a
probability on a bin edge, as vote shares ``k / N`` are, into the bin below instead of ``[left, right)`` (a case
pinned in tests/test_segmentation_eval.py: 0.175 here, 0.025 in MONAI), and sums in float32.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.data.brats import BRATS_LABELS, BRATS_REGIONS, region_masks
from meddiff3d.data.images import GRID_ATOL_MM
from meddiff3d.errors import InputError
from meddiff3d.evaluation.anomaly_metrics import dice
from meddiff3d.models.segdiff import binary_entropy
from meddiff3d.utils.io import atomic_path, json_safe, read_channels, save_json

__all__ = ["region_metrics", "case_metrics", "calibration_error", "error_capture", "binary_entropy",
           "evaluate_segmentation_dir", "read_prediction", "summarise", "comparison_table", "UNCERTAINTY_FILES"]

#: optional per-region maps of the contract: file suffix -> uncertainty source name
UNCERTAINTY_FILES = {"variance": "variance", "entropy": "entropy"}
logger = logging.getLogger("meddiff3d.evaluation")


# ------------------------------------------------------------------------------------------------------ metrics
def spacing_of(affine) -> tuple[float, ...]:
    """Voxel sizes (mm) of a 4x4 affine: the norms of its first three columns."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(a[:3, :3], axis=0))


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
              empty_hd95: str | float = "diagonal") -> tuple[float, float]:
    """``(dice, hd95 in mm)`` of two binary masks (:func:`dice`, MONAI's HD95); empty masks as in the module
    docstring."""
    from monai.metrics import compute_hausdorff_distance

    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    overlap = dice(pred, truth)  # raises on masks of different shapes
    if not pred.any() and not truth.any():
        return overlap, 0.0
    if not pred.any() or not truth.any():
        return overlap, _empty_hd95(empty_hd95, truth.shape, spacing)
    p, t = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(truth)[None, None].float()
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own use of a deprecated argument
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                        spacing=[float(s) for s in spacing])
    return overlap, float(hd[0, 0])


def _empty_hd95(rule: str | float, shape: Sequence[int], spacing: Sequence[float]) -> float:
    if rule == "diagonal":
        return float(np.linalg.norm(np.asarray(shape, np.float64) * np.asarray(spacing, np.float64)))
    if rule == "nan":
        return math.nan
    try:
        return float(rule)
    except (TypeError, ValueError):
        raise ValueError(f"empty_hd95 must be 'diagonal', 'nan' or a number of mm, got {rule!r}") from None


def calibration_error(prob: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of probabilities ``prob`` against binary ``truth`` (flattened, same size)."""
    p = np.asarray(prob, np.float64).ravel()
    y = np.asarray(truth, bool).ravel()
    if p.size == 0:
        return math.nan
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    gap = np.abs(np.bincount(index, weights=y, minlength=bins) - np.bincount(index, weights=p, minlength=bins))
    return float(gap.sum() / count.sum())  # sum_b n_b/N * |mean y_b - mean p_b| = sum_b |sum y_b - sum p_b| / N


def error_capture(errors: np.ndarray, uncertainty: np.ndarray, top_percent: float) -> tuple[float, float]:
    """``(share of errors inside the top-k % uncertainty region, that region's share of the voxels)``.

    Both arguments are flat arrays over the domain voxels; see the module docstring for ties and zero uncertainty.
    """
    errors = np.asarray(errors, bool).ravel()
    u = np.asarray(uncertainty, np.float64).ravel()
    if u.size == 0:
        return math.nan, math.nan
    n_top = min(u.size, max(1, math.ceil(top_percent / 100.0 * u.size)))
    threshold = np.partition(u, u.size - n_top)[u.size - n_top]
    top = (u >= threshold) & (u > 0)
    fraction = float(top.mean())
    n_err = int(errors.sum())
    return (float((errors & top).sum() / n_err) if n_err else math.nan), fraction


def region_metrics(pred_labels: np.ndarray, true_labels: np.ndarray, spacing: Sequence[float], *,
                   convention: str = "brats2021", prob: np.ndarray | None = None,
                   uncertainty: Mapping[str, np.ndarray] | None = None, domain: np.ndarray | None = None,
                   top_percent: float = 5.0, bins: int = 10, empty_hd95: str | float = "diagonal") -> dict[str, Any]:
    """All metrics of one case as a flat dict ``{"WT_dice": ..., "TC_hd95": ..., ...}``.

    Args:
        pred_labels, true_labels: BraTS label maps of one shape, in ``convention``.
        spacing: voxel sizes in mm (HD95, volumes).
        prob: ``(*spatial, 3)`` per-region probabilities (WT, TC, ET), for ``ece`` and the ``pentropy`` source.
        uncertainty: ``{source: (*spatial, 3)}`` per-region uncertainty maps (e.g. ``variance``, ``entropy``).
        domain: boolean mask of the voxels ECE and error capture are computed over (default: all).
        top_percent: ``k`` of the top-``k`` % uncertainty region.
    """
    shape = np.shape(true_labels)
    domain = np.ones(shape, bool) if domain is None else np.asarray(domain, bool)
    sources = dict(uncertainty or {})
    if prob is not None:
        sources["pentropy"] = binary_entropy(prob)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_masks, true_masks = region_masks(np.asarray(pred_labels), convention), region_masks(np.asarray(true_labels),
                                                                                            convention)
    k = f"{top_percent:g}"
    healthy = domain & ~true_masks["WT"]  # tumour-free domain voxels, for prob_healthy
    out: dict[str, Any] = {}
    for c, region in enumerate(BRATS_REGIONS):
        pred, truth = pred_masks[region], true_masks[region]
        dice, hd95 = dice_hd95(pred, truth, spacing, empty_hd95)
        out[f"{region}_dice"], out[f"{region}_hd95"] = dice, hd95
        out[f"{region}_pred_ml"], out[f"{region}_true_ml"] = pred.sum() * voxel_ml, truth.sum() * voxel_ml
        if prob is not None:
            out[f"{region}_ece"] = calibration_error(prob[..., c][domain], truth[domain], bins)
            out[f"{region}_prob_healthy"] = float(prob[..., c][healthy].mean()) if healthy.any() else math.nan
        errors = (pred != truth)[domain]
        for source, volume in sources.items():
            capture, fraction = error_capture(errors, volume[..., c][domain], top_percent)
            out[f"{region}_err_top{k}_{source}"] = capture
            out[f"{region}_err_top{k}_{source}_frac"] = fraction
    return out


# --------------------------------------------------------------------------------------------- files and checks
def _read_3d(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    from meddiff3d.data.images import read_image

    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    return read_image(path)


def _read_regions(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    try:
        data, found_affine = read_channels(path)
    except Exception as err:  # unreadable, or neither vectors nor channel-last (read_channels' "<path>: shape")
        raise InputError(str(err) if str(err).startswith(f"{path}: shape") else
                         f"{path}: unreadable NIfTI ({type(err).__name__}: {err})") from err
    expected = (*shape, len(BRATS_REGIONS))
    if data.shape != expected:
        raise InputError(f"{path}: shape {data.shape}, expected {expected} (the label's grid, a vector per voxel "
                         f"{', '.join(BRATS_REGIONS)}: (X, Y, Z, 1, 3), or channel-last)")
    _check_affine(path, found_affine, affine)
    if not np.isfinite(data).all():
        raise InputError(f"{path}: holds NaN or Inf values")
    return data


def _check_affine(path: Path, found, expected) -> None:
    diff = float(np.max(np.abs(np.asarray(found, np.float64) - np.asarray(expected, np.float64))))
    if diff > GRID_ATOL_MM:
        raise InputError(f"{path}: affine differs from the ground-truth label's by up to {diff:.4g} mm (tolerance "
                         f"{GRID_ATOL_MM} mm); predictions must be on the input grid")


def _label_values(labels: np.ndarray, convention: str, path: Path) -> None:
    allowed = {0, *BRATS_LABELS[convention].values()}
    values = set(np.unique(labels).tolist())
    if not all(float(v).is_integer() for v in values) or not values <= allowed:
        raise InputError(f"{path}: label values {sorted(values - allowed)} are not part of the {convention} "
                         f"convention {sorted(allowed)}")


def detect_convention(labels: np.ndarray, declared: str | None, path: Path) -> str:
    """The item's declared ``convention``, else brats2023 if label 3 occurs, else brats2021."""
    if declared:
        if declared not in BRATS_LABELS:
            raise InputError(f"{path}: unknown label convention {declared!r}; expected one of {list(BRATS_LABELS)}")
        return declared
    values = set(np.unique(labels).tolist())
    if {3, 4} <= values:
        raise InputError(f"{path}: holds both labels 3 and 4; set label_convention (brats2021 or brats2023)")
    return "brats2023" if 3 in values else "brats2021"


def read_prediction(pred_dir: str | os.PathLike, case_id: str, shape: tuple[int, ...], affine,
                    convention: str) -> dict[str, Any]:
    """The prediction files of one case, checked against the ground truth's grid: ``{"seg", "prob"?, "variance"?,
    "entropy"?}`` (arrays; ``prob``/uncertainties ``(*shape, 3)``)."""
    folder = Path(pred_dir) / case_id
    seg_path = folder / f"{case_id}_seg.nii.gz"
    seg, seg_affine = _read_3d(seg_path, "prediction (label map) file")
    if seg.shape != tuple(shape):
        raise InputError(f"{seg_path}: shape {seg.shape} differs from the ground-truth label's {tuple(shape)}")
    _check_affine(seg_path, seg_affine, affine)
    _label_values(seg, convention, seg_path)
    out: dict[str, Any] = {"seg": seg.astype(np.uint8)}
    prob_path = folder / f"{case_id}_prob.nii.gz"
    if prob_path.is_file():
        prob = _read_regions(prob_path, tuple(shape), affine)
        if prob.min() < -1e-4 or prob.max() > 1 + 1e-4:
            raise InputError(f"{prob_path}: probabilities outside [0, 1] (min {prob.min():.4g}, max {prob.max():.4g})")
        out["prob"] = np.clip(prob, 0.0, 1.0)
    for suffix, source in UNCERTAINTY_FILES.items():
        path = folder / f"{case_id}_{suffix}.nii.gz"
        if path.is_file():
            volume = _read_regions(path, tuple(shape), affine)
            if volume.min() < -1e-6:
                raise InputError(f"{path}: negative {suffix} values (min {volume.min():.4g})")
            out[source] = volume
    return out


def _brain_domain(item: Mapping, shape: tuple[int, ...]) -> np.ndarray | None:
    from meddiff3d.data.images import read_image

    files = item["image"] if isinstance(item["image"], list) else [item["image"]]
    mask = np.zeros(shape, bool)
    for file in files:
        array, _ = read_image(file)
        if array.shape != shape:
            raise InputError(f"{file}: shape {array.shape} differs from the label's {shape}")
        mask |= array != 0
    return mask if mask.any() else None


def case_id_of(item: Mapping) -> str:
    """The case id of a datalist item: its ``id``, else the label file name without suffixes."""
    return str(item.get("id") or Path(item["label"]).name.split(".")[0])


def case_metrics(pred_dir: str | os.PathLike, item: Mapping, *, domain: str = "brain", **kwargs: Any) -> dict:
    """:func:`region_metrics` of one datalist item (absolute paths, as ``load_datalist`` returns them) and its
    prediction files in ``pred_dir``; ``domain`` is ``"brain"`` or ``"volume"``; ``kwargs`` go to region_metrics."""
    label_path = Path(item["label"])
    truth, affine = _read_3d(label_path, "ground-truth label")
    convention = detect_convention(truth, item.get("convention"), label_path)
    _label_values(truth, convention, label_path)
    pred = read_prediction(pred_dir, case_id_of(item), truth.shape, affine, convention)
    mask = _brain_domain(item, truth.shape) if domain == "brain" else None
    uncertainty = {s: pred[s] for s in UNCERTAINTY_FILES.values() if s in pred}
    return region_metrics(pred["seg"], truth, spacing_of(affine), convention=convention, prob=pred.get("prob"),
                          uncertainty=uncertainty, domain=mask, **kwargs)


# ------------------------------------------------------------------------------------------------- directories
def evaluate_segmentation_dir(pred_dir: str | os.PathLike, datalist: str | os.PathLike, section: str | None = "test",
                              out_csv: str | os.PathLike | None = None, out_json: str | os.PathLike | None = None, *,
                              top_percent: float = 5.0, bins: int = 10, empty_hd95: str | float = "diagonal",
                              domain: str = "brain") -> dict[str, Any]:
    """Evaluate the predictions in ``pred_dir`` (module docstring contract) against ``datalist[section]`` labels.

    Writes ``out_csv`` (one row per case) and ``out_json`` (the summary, and the per-case rows) atomically if given.
    Returns ``{"cases": [row, ...], "summary": {metric: {"mean", "median", "std", "n"}}, "settings": {...}}``; NaN
    values (e.g. no error to capture) are left out of the statistics, ``n`` counts the rest.
    """
    from meddiff3d.data.datalist import check_datalist

    if domain not in ("brain", "volume"):
        raise ValueError(f"domain must be 'brain' or 'volume', got {domain!r}")
    _empty_hd95(empty_hd95, (1, 1, 1), (1.0, 1.0, 1.0))  # a bad rule fails before any work
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputError(f"prediction folder {pred_dir} does not exist")
    sections = check_datalist(datalist, [section] if section else None, require_label=True, check_images="header")
    items = [it for found in sections.values() for it in found]  # section None: every one with items
    rows = []
    for item in items:
        metrics = case_metrics(pred_dir, item, top_percent=top_percent, bins=bins, empty_hd95=empty_hd95,
                               domain=domain)
        rows.append({"id": case_id_of(item), **{k: _round(v) for k, v in metrics.items()}})
    result = {"settings": {"pred_dir": str(pred_dir), "datalist": str(datalist), "section": section,
                           "top_percent": top_percent, "bins": bins, "empty_hd95": empty_hd95, "domain": domain,
                           "regions": list(BRATS_REGIONS)},
              "summary": summarise(rows), "cases": rows}
    if out_csv is not None:
        write_csv(rows, out_csv)
    if out_json is not None:
        save_json(json_safe(result), out_json)
    means = {k: v["mean"] for k, v in result["summary"].items() if k.endswith(("_dice", "_hd95"))}
    logger.info("segmentation evaluation of %d case(s) in %s, mean over cases: %s -> %s", len(rows), pred_dir,
                ", ".join(f"{k} {v:.3f}" for k, v in means.items()), [str(f) for f in (out_csv, out_json) if f])
    return result


def _round(value):
    return round(float(value), 6) if isinstance(value, (float, np.floating, int, np.integer)) else value


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """``{metric: {"mean", "median", "std", "n"}}`` over the finite values of each numeric column."""
    out: dict[str, dict[str, float]] = {}
    keys = [k for k in (rows[0] if rows else {}) if k != "id"]
    for key in keys:
        values = np.array([r.get(key, math.nan) for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = {"mean": float(finite.mean()) if finite.size else math.nan,
                    "median": float(np.median(finite)) if finite.size else math.nan,
                    "std": float(finite.std()) if finite.size else math.nan, "n": int(finite.size)}
    return out


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Rows as CSV (columns of the first row; NaN written as an empty cell), atomically."""
    columns = list(rows[0]) if rows else ["id"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return Path(path)


def comparison_table(results: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] = ("dice", "hd95", "ece"),
                     statistic: str = "mean") -> str:
    """A text table of ``statistic`` per region and metric, one column per named result (e.g. diffusion, baseline).

    Only metrics present in at least one result are shown; error-capture metrics are added for every source found.
    """
    names = list(results)
    keys = [f"{r}_{m}" for m in metrics for r in BRATS_REGIONS]
    extra = sorted({k.split("_", 1)[1] for res in results.values() for k in res["summary"]
                    if "_err_top" in k and not k.endswith("_frac")})
    keys += [f"{r}_{m}" for m in extra for r in BRATS_REGIONS]
    width = max(14, *(len(n) for n in names))
    lines = [f"{statistic + ' over cases':<30}" + "".join(f"{n:>{width + 2}}" for n in names)]
    for key in keys:
        cells = []
        for name in names:
            stat = results[name]["summary"].get(key)
            value = None if stat is None else stat.get(statistic)
            cells.append("-" if value is None or not math.isfinite(value) else f"{value:.4g}")
        if all(c == "-" for c in cells):
            continue
        lines.append(f"{key:<30}" + "".join(f"{c:>{width + 2}}" for c in cells))
    lines.append(f"{'cases':<30}" + "".join(f"{len(results[n]['cases']):>{width + 2}}" for n in names))
    return "\n".join(lines)
