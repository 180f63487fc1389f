"""Unsupervised anomaly detection by healing: a model trained on healthy volumes replaces what it finds unlikely
(:mod:`.healing`); the residual, z-scored against healthy volumes and thresholded at a calibrated false-positive rate,
is the anomaly map (:mod:`.calibration`). The pipeline (files in, NIfTI out) is :mod:`meddiff3d.pipelines.anomaly`,
the evaluation :mod:`meddiff3d.evaluation.anomaly`."""

from .calibration import (CALIBRATION_FORMAT, Calibration, anomaly_map, load_calibration, residuals, save_calibration,
                          top_mean, volume_score)
from .healing import (METHODS, NOISE_KINDS, AnomalyModels, DetectorSettings, brain_mask, heal, load_anomaly_models,
                      partial_timesteps, stage_one)

__all__ = ["CALIBRATION_FORMAT", "Calibration", "anomaly_map", "load_calibration", "residuals", "save_calibration",
           "top_mean", "volume_score", "METHODS", "NOISE_KINDS", "AnomalyModels", "DetectorSettings", "brain_mask",
           "heal", "load_anomaly_models", "partial_timesteps", "stage_one"]
