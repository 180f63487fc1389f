"""Segmentation-free metrics of anomaly maps, numpy only (no scikit-learn).

Per volume (exact, over the voxels given, usually the brain): :func:`dice` at a threshold, :func:`best_dice` (the
maximum over every threshold), :func:`average_precision` (AUPRC as the step-wise average precision) and
:func:`roc_auc` (the Mann-Whitney statistic, ties counted one half). Pooled over many full-size volumes the voxels do
not fit in memory, so :class:`ScoreHistogram` accumulates positive and negative counts in fixed bins (the calibrated
threshold is a bin edge, so Dice there is exact) and computes the same metrics from the counts, treating scores
within one bin as ties. :func:`dice` is the package's one Dice (the BraTS evaluation,
:mod:`meddiff3d.evaluation.segmentation`, uses it too): exact integer counts, 1 when both masks are empty.

Why not ``monai.metrics``: pooled over a test set the brain voxels number over 10^8 and MONAI's ``ROCAUCMetric`` /
``AveragePrecisionMetric`` buffer every score, so the pooled metrics have to stream (:class:`ScoreHistogram`); MONAI
has no best-Dice sweep. The per-volume functions are the exact references the histogram is tested against; MONAI's
``compute_roc_auc`` / ``compute_average_precision`` give the same numbers (tests/test_anomaly_metrics.py checks it)
but walk the voxels in a Python loop (twice as slow on 2M voxels), need tensors, warn on every lesion-free volume and
return nan for the average precision of an all-lesion one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["dice", "best_dice", "average_precision", "roc_auc", "ScoreHistogram"]


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    return s, y


def dice(pred, target) -> float:
    """``2 |P & T| / (|P| + |T|)`` of two binary masks of one shape; 1 when both are empty (a correct "nothing")."""
    p, t = np.asarray(pred).astype(bool), np.asarray(target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} vs {t.shape}")
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def _descending_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct thresholds (descending) with the cumulative true and false positives of ``score >= threshold``."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last_of_group]
    fp = (last_of_group + 1) - tp
    return s[last_of_group], tp.astype(np.float64), fp.astype(np.float64)


def best_dice(scores, labels) -> tuple[float, float]:
    """``(best Dice, its threshold)`` over all thresholds ``score >= threshold``; ``(nan, nan)`` without positives."""
    s, y = _flat(scores, labels)
    positives = float(y.sum())
    if positives == 0 or s.size == 0:
        return float("nan"), float("nan")
    thresholds, tp, fp = _descending_counts(s, y)
    values = 2.0 * tp / (tp + fp + positives)
    i = int(np.argmax(values))
    return float(values[i]), float(thresholds[i])


def average_precision(scores, labels) -> float:
    """AUPRC as ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds; nan without positives."""
    s, y = _flat(scores, labels)
    positives = float(y.sum())
    if positives == 0:
        return float("nan")
    _, tp, fp = _descending_counts(s, y)
    precision = tp / (tp + fp)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_auc(scores, labels) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie); nan if one class is missing."""
    s, y = _flat(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # 0-based rank of each distinct value's first occurrence
    ranks = (starts + (counts + 1) / 2.0)[inverse]  # average 1-based ranks
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class ScoreHistogram:
    """Positive / negative voxel counts per score bin, for metrics pooled over many volumes.

    Args:
        low, high: range of the bins; scores outside are counted in the first / last bin.
        bins: number of bins; ``threshold`` (if given) is made a bin edge so Dice at it is exact.
    """

    def __init__(self, low: float = -5.0, high: float = 50.0, bins: int = 8192, threshold: float | None = None):
        edges = np.linspace(float(low), float(high), int(bins) + 1)
        if threshold is not None and low < threshold < high:
            edges = np.unique(np.r_[edges, float(threshold)])
        self.edges, self.threshold = edges, threshold
        self.positive = np.zeros(edges.size - 1, dtype=np.int64)
        self.negative = np.zeros(edges.size - 1, dtype=np.int64)

    def add(self, scores, labels) -> None:
        s, y = _flat(scores, labels)
        index = np.clip(np.searchsorted(self.edges, s, side="right") - 1, 0, self.positive.size - 1)
        self.positive += np.bincount(index[y], minlength=self.positive.size)
        self.negative += np.bincount(index[~y], minlength=self.negative.size)

    def merge(self, others: Sequence[ScoreHistogram]) -> ScoreHistogram:
        out = ScoreHistogram.__new__(ScoreHistogram)
        out.edges, out.threshold = self.edges, self.threshold
        out.positive = self.positive + sum(o.positive for o in others)
        out.negative = self.negative + sum(o.negative for o in others)
        return out

    def metrics(self) -> dict[str, float | int | None]:
        """``auroc, auprc, best_dice, best_threshold, dice`` (at ``threshold``, i.e. ``score > threshold`` up to the
        bin edge), ``positives, negatives``; nan where undefined."""
        pos, neg = self.positive[::-1].astype(np.float64), self.negative[::-1].astype(np.float64)
        lower_edges = self.edges[:-1][::-1]
        n_pos, n_neg = pos.sum(), neg.sum()
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        out: dict[str, float | int | None] = {"positives": int(n_pos), "negatives": int(n_neg)}
        if n_pos and n_neg:
            # Mann-Whitney from bins: each positive beats the negatives of lower bins and ties those of its own
            below = n_neg - fp
            out["auroc"] = float(np.sum(pos * (below + 0.5 * neg)) / (n_pos * n_neg))
        else:
            out["auroc"] = float("nan")
        if n_pos:
            keep = (pos + neg) > 0
            precision = tp[keep] / (tp[keep] + fp[keep])
            recall = tp[keep] / n_pos
            out["auprc"] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
            values = 2 * tp[keep] / (tp[keep] + fp[keep] + n_pos)
            i = int(np.argmax(values))
            out["best_dice"], out["best_threshold"] = float(values[i]), float(lower_edges[keep][i])
        else:
            out.update(auprc=float("nan"), best_dice=float("nan"), best_threshold=float("nan"))
        if self.threshold is not None:
            above = self.edges[:-1] >= self.threshold
            tp_t, fp_t = float(self.positive[above].sum()), float(self.negative[above].sum())
            total = tp_t + fp_t + n_pos
            out["dice"] = float(2 * tp_t / total) if total else 1.0
        return out
