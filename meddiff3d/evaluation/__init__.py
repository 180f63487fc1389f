"""Evaluation of trained generators: label-free morphometry (conditioning fidelity), MS-SSIM diversity, Fréchet
distances on fixed features, nearest-neighbour memorisation checks; :func:`evaluate` runs them all.
Segmentation (BraTS WT/TC/ET Dice, HD95, calibration, uncertainty vs errors): :func:`evaluate_segmentation_dir`."""

from .features import RandomConvFeatures, frechet_distance, handcrafted_features
from .generative import agreement, evaluate, memorisation
from .generative_report import summary_table
from .morphometry import Calibration, calibrate, measure_volumes, to_model_scale
from .segmentation import comparison_table, evaluate_segmentation_dir, region_metrics
from .similarity import ms_ssim, ms_ssim_config, nearest_neighbours, nn_vector, pairwise_ms_ssim

__all__ = ["evaluate", "summary_table", "agreement", "memorisation", "measure_volumes", "to_model_scale",
           "calibrate", "Calibration", "RandomConvFeatures", "frechet_distance", "handcrafted_features", "ms_ssim",
           "ms_ssim_config", "pairwise_ms_ssim", "nn_vector", "nearest_neighbours", "evaluate_segmentation_dir",
           "region_metrics", "comparison_table"]
