"""Anomaly metrics and calibration arithmetic on constructed inputs whose answers are known analytically."""

import math

import numpy as np
import pytest

from meddiff3d.anomaly.calibration import quantile, top_mean
from meddiff3d.evaluation.anomaly import case_metrics, volume_level_auroc
from meddiff3d.evaluation.anomaly_metrics import ScoreHistogram, average_precision, best_dice, dice, roc_auc


def normal_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_perfect_map_scores_one_everywhere(rng):
    labels = rng.random(20000) < 0.1
    scores = labels.astype(float) + 0.01 * rng.random(labels.size)
    assert roc_auc(scores, labels) == 1.0
    assert average_precision(scores, labels) == pytest.approx(1.0)
    assert best_dice(scores, labels)[0] == pytest.approx(1.0)
    assert dice(scores > 0.5, labels) == 1.0
    metrics = ScoreHistogram(low=-1, high=2, bins=300, threshold=0.5)
    metrics.add(scores, labels)
    pooled = metrics.metrics()
    assert pooled["auroc"] == 1.0 and pooled["dice"] == 1.0 and pooled["best_dice"] == pytest.approx(1.0)
    assert pooled["auprc"] == pytest.approx(1.0)


def test_inverted_and_constant_maps():
    labels = np.r_[np.ones(30, bool), np.zeros(70, bool)]
    scores = np.r_[np.zeros(30), np.ones(70)]
    assert roc_auc(scores, labels) == 0.0
    assert roc_auc(np.zeros(100), labels) == 0.5  # all ties count one half
    # a constant map flags everything at its best threshold: Dice = 2P / (N + P)
    assert best_dice(np.zeros(100), labels)[0] == pytest.approx(2 * 30 / 130)
    assert average_precision(np.zeros(100), labels) == pytest.approx(0.3)


def test_random_map_is_at_chance(rng):
    n, prevalence = 40000, 0.1
    labels = rng.random(n) < prevalence
    scores = rng.random(n)
    # AUROC of an uninformative map: mean 0.5, std sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)) ~ 0.005 here
    assert abs(roc_auc(scores, labels) - 0.5) < 0.02
    assert abs(average_precision(scores, labels) - labels.mean()) < 0.02


def test_gaussian_separation_matches_the_closed_form(rng):
    """Scores N(d, 1) in lesions and N(0, 1) outside: AUROC = Phi(d / sqrt(2))."""
    d = 1.0
    labels = rng.random(100000) < 0.2
    scores = rng.normal(size=labels.size) + d * labels
    expected = normal_cdf(d / math.sqrt(2))  # 0.7602
    exact = roc_auc(scores, labels)
    assert abs(exact - expected) < 0.01
    hist = ScoreHistogram(low=-6, high=8, bins=4096, threshold=1.0)
    hist.add(scores[:50000], labels[:50000])
    second = ScoreHistogram(low=-6, high=8, bins=4096, threshold=1.0)
    second.add(scores[50000:], labels[50000:])
    pooled = hist.merge([second]).metrics()
    assert pooled["auroc"] == pytest.approx(exact, abs=1e-3)
    assert pooled["auprc"] == pytest.approx(average_precision(scores, labels), abs=2e-3)
    assert pooled["best_dice"] == pytest.approx(best_dice(scores, labels)[0], abs=2e-3)
    assert pooled["dice"] == pytest.approx(dice(scores >= 1.0, labels), abs=1e-9)  # the threshold is a bin edge


def test_per_volume_metrics_equal_monai(rng):
    """MONAI's compute_roc_auc / compute_average_precision give the same numbers (ties included); see the module
    docstring for why the hand-written ones stay."""
    import torch
    from monai.metrics import compute_average_precision, compute_roc_auc

    scores = np.round(rng.random(5000), 2)  # many ties
    labels = rng.random(scores.size) < scores
    s, y = torch.as_tensor(scores), torch.as_tensor(labels.astype(np.int64))
    assert roc_auc(scores, labels) == pytest.approx(float(compute_roc_auc(s, y)), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(float(compute_average_precision(s, y)), abs=1e-12)


def test_dice_edge_cases_and_missing_classes():
    assert dice(np.zeros(5, bool), np.zeros(5, bool)) == 1.0
    assert dice(np.ones(4, bool), np.r_[np.ones(2, bool), np.zeros(2, bool)]) == pytest.approx(2 * 2 / 6)
    assert math.isnan(roc_auc(np.arange(5.0), np.zeros(5, bool)))
    assert math.isnan(best_dice(np.arange(5.0), np.zeros(5, bool))[0])
    healthy = case_metrics(np.arange(10.0), np.zeros(10, bool), threshold=6.5)
    assert healthy["lesion_voxels"] == 0 and math.isnan(healthy["dice"])
    assert healthy["flagged_normal_fraction"] == pytest.approx(0.3)


def test_volume_level_auroc_separates_kinds():
    rows = [{"lesion_kind": "none", "volume_score": s} for s in (1.0, 2.0)]
    rows += [{"lesion_kind": "tumour", "volume_score": s} for s in (3.0, 4.0)]
    rows += [{"lesion_kind": "dark", "volume_score": s} for s in (0.5, 1.5)]
    assert volume_level_auroc(rows, "tumour") == 1.0
    assert volume_level_auroc(rows, "dark") == pytest.approx(0.25)  # 0.5 and 1.5 against 1 and 2: one win of four
    assert volume_level_auroc(rows) == pytest.approx((4 + 1) / 8)


def test_calibration_quantile_keeps_the_false_positive_rate(rng):
    healthy = rng.normal(size=12345)
    for fpr in (0.01, 0.05, 0.2):
        threshold = quantile(healthy, 1 - fpr)
        assert (healthy > threshold).mean() <= fpr
        assert (healthy >= threshold).mean() >= fpr  # and no stricter than needed
    assert top_mean(np.arange(100.0), 0.05) == pytest.approx(97.0)
    assert top_mean(np.arange(10.0), 0.001) == 9.0 and top_mean(np.array([]), 0.1) == 0.0
