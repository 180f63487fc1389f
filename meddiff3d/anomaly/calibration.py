"""From healed volumes to calibrated anomaly maps, and the calibration file that makes inference self-contained.

Scoring (Graham et al. 2023, per voxel): for each starting step ``k`` the residual ``e_k = smooth|x - healed_k|`` is
z-scored with the mean and standard deviation of ``e_k`` over the brain voxels of healthy validation volumes,
``s_k = (e_k - mu_k) / sigma_k``, and the anomaly map is the average ``mean_k s_k`` inside the brain (0 outside).

With ``residual_normalisation="per_volume"`` (the default since calibration format 2) each ``e_k`` is first divided
by its own volume's 90th percentile over the brain voxels (:data:`RESIDUAL_SCALE_QUANTILE`), and the healthy
statistics are fitted on those. A volume from another scanner, whose residuals are larger or smaller overall (other
contrast, noise, resolution), is then scored against its own healthy tissue, and the calibrated threshold keeps its
false-positive rate (tests/test_anomaly_calibration.py: a 5 % target stays at 4.1-7.6 % on contrast-changed healthy
volumes, where the raw residuals give 1.5-22 %). Centred robust z-scores (median / MAD) were tried first and do not
do this: a contrast change moves the bulk of the residuals more than their upper tail, which is what the threshold
cuts. The price is that a lesion is measured against the volume's own upper residuals: lesions up to ~10 % of the
brain are unaffected, larger ones lift the scale and fade. What no per-volume scale absorbs is a different *pattern*
of residuals; calibration on the site's own healthy scans stays the documented step.

Calibration file (JSON, written atomically; ``models/calibration.json`` by default)::

    {"format": "meddiff3d.anomaly_calibration/1",
     "settings": DetectorSettings.to_dict(),             # the detector is rebuilt from these at inference
     "models": {"codec": {"file", "sha256"}, "diffusion": {"file", "sha256"} | null},
     "image": {"shape", "spacing", "normalisation"},
     "mask_thresholds": [per starting step] | [],        # stage-one quantiles that decide what is healed
     "residual_stats": [{"step", "mean", "std"}],        # z-scoring of each step's residual
     "threshold": float, "target_fpr": float, "calibration_fpr": float,
     "volume_scores": {"healthy": [...], "mean", "std", "threshold"},
     "healthy": {"datalist", "section", "ids", "brain_voxels"}}
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.errors import InputError
from meddiff3d.utils.io import read_json, save_json

from .healing import DetectorSettings, brain_mask, smooth

__all__ = ["CALIBRATION_FORMAT", "READABLE_FORMATS", "Calibration", "residuals", "quantile_scale", "anomaly_map",
           "volume_score", "top_mean", "fit_residual_stats",
           "quantile", "save_calibration", "load_calibration"]

CALIBRATION_FORMAT = "meddiff3d.anomaly_calibration/2"
#: format 1 files (before per-volume normalisation) load with ``residual_normalisation="calibration"``, their meaning
READABLE_FORMATS = ("meddiff3d.anomaly_calibration/1", CALIBRATION_FORMAT)
#: the quantile of a volume's own brain residuals its residual map is divided by (``per_volume`` normalisation)
RESIDUAL_SCALE_QUANTILE = 0.9
_MIN_STD = 1e-6


@dataclass
class Calibration:
    """What inference needs besides the model weights (layout in the module docstring)."""

    settings: DetectorSettings
    models: dict[str, Any]
    image: dict[str, Any]
    mask_thresholds: list[float]
    residual_stats: list[dict[str, float]]
    threshold: float
    target_fpr: float
    calibration_fpr: float
    volume_scores: dict[str, Any]
    healthy: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"format": CALIBRATION_FORMAT, "settings": self.settings.to_dict(), "models": self.models,
                "image": self.image, "mask_thresholds": [float(t) for t in self.mask_thresholds],
                "residual_stats": self.residual_stats, "threshold": float(self.threshold),
                "target_fpr": float(self.target_fpr), "calibration_fpr": float(self.calibration_fpr),
                "volume_scores": self.volume_scores, "healthy": self.healthy}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> Calibration:
        if not isinstance(data, Mapping) or data.get("format") not in READABLE_FORMATS:
            raise InputError(f"{source} is not a meddiff3d anomaly calibration (format {CALIBRATION_FORMAT!r})")
        try:
            values = dict(data["settings"])
            if data["format"] == READABLE_FORMATS[0]:
                values.setdefault("residual_normalisation", "calibration")
            settings = DetectorSettings.from_dict(values)
            cal = cls(settings, dict(data["models"]), dict(data["image"]), list(data["mask_thresholds"]),
                      list(data["residual_stats"]), float(data["threshold"]), float(data["target_fpr"]),
                      float(data["calibration_fpr"]), dict(data["volume_scores"]), dict(data.get("healthy") or {}))
        except KeyError as err:
            raise InputError(f"{source}: missing entry {err}") from None
        except InputError as err:
            raise InputError(f"{source}: {err}") from None
        except (TypeError, ValueError) as err:  # e.g. a threshold "abc", models a list: a damaged or edited file
            raise InputError(f"{source}: an entry has the wrong type ({err})") from None
        if len(cal.residual_stats) != len(settings.step_names):
            raise InputError(f"{source}: {len(cal.residual_stats)} residual statistics for steps {settings.step_names}")
        return cal


# ------------------------------------------------------------------------------------------------ scoring
def residuals(x: torch.Tensor, healed: Sequence[torch.Tensor], settings: DetectorSettings) -> list[torch.Tensor]:
    """``smooth|x - healed_k|`` per step, 0 outside the brain; with ``per_volume`` normalisation each map is divided
    by its own brain's :data:`RESIDUAL_SCALE_QUANTILE` quantile (module docstring)."""
    brain = brain_mask(x, settings.brain_threshold)
    maps = [smooth((x - h).abs(), settings.smoothing_sigma) * brain for h in healed]
    if settings.residual_normalisation == "per_volume":
        maps = [quantile_scale(e, brain) for e in maps]
    return maps


def quantile_scale(e: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """``e`` divided by its :data:`RESIDUAL_SCALE_QUANTILE` quantile over the brain voxels, 0 outside the brain."""
    inside = e[brain > 0].float()
    if inside.numel() == 0:
        return torch.zeros_like(e)
    k = max(1, int(math.ceil(RESIDUAL_SCALE_QUANTILE * inside.numel())))
    scale = float(inside.kthvalue(k).values)
    return e / max(scale, _MIN_STD) * brain


def anomaly_map(x: torch.Tensor, residual_maps: Sequence[torch.Tensor], stats: Sequence[Mapping[str, float]],
                settings: DetectorSettings) -> torch.Tensor:
    """The mean of the per-step z-scored residuals inside the brain, 0 outside."""
    if len(residual_maps) != len(stats):
        raise ValueError(f"{len(residual_maps)} residual maps for {len(stats)} statistics")
    brain = brain_mask(x, settings.brain_threshold)
    total = torch.zeros_like(residual_maps[0])
    for e, s in zip(residual_maps, stats):
        total += (e - float(s["mean"])) / max(float(s["std"]), _MIN_STD)
    return total / len(residual_maps) * brain


def volume_score(score_map: torch.Tensor | np.ndarray, brain: torch.Tensor | np.ndarray, top_fraction: float) -> float:
    """Mean of the top ``top_fraction`` of the brain voxels' scores (at least one voxel; 0 for an empty brain)."""
    values = np.asarray(torch.as_tensor(score_map).float().cpu()).ravel()
    return top_mean(values[np.asarray(torch.as_tensor(brain).cpu()).ravel() > 0], top_fraction)


def top_mean(values: np.ndarray, top_fraction: float) -> float:
    """Mean of the largest ``round(top_fraction * n)`` values (at least one; 0 for no values)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    k = max(1, int(round(top_fraction * values.size)))
    return float(np.partition(values, values.size - k)[values.size - k:].mean())


def quantile(values: np.ndarray, q: float) -> float:
    """The ``q`` quantile with the "higher" rule: at most ``1 - q`` of ``values`` lie strictly above it."""
    return float(np.quantile(np.asarray(values, dtype=np.float64), q, method="higher"))


def fit_residual_stats(per_volume: Sequence[Sequence[np.ndarray]], names: Sequence[str]) -> list[dict[str, float]]:
    """Mean and standard deviation per step over all healthy brain voxels; ``per_volume[v][k]`` are the brain-voxel
    residuals of step ``k`` in volume ``v``."""
    out = []
    for k, name in enumerate(names):
        values = np.concatenate([np.asarray(v[k], dtype=np.float64) for v in per_volume])
        out.append({"step": name, "mean": float(values.mean()), "std": float(max(values.std(), _MIN_STD))})
    return out


# ------------------------------------------------------------------------------------------------ file
def save_calibration(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write the calibration JSON atomically (next to the weights)."""
    return save_json(calibration.to_dict(), path)


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a calibration file; a missing or foreign file is an :class:`InputError` naming it."""
    data = read_json(path, missing="anomaly calibration file {path} does not exist (run the calibrate config first)",
                     invalid="anomaly calibration file {path} is not valid JSON ({err})")
    return Calibration.from_dict(data, source=f"anomaly calibration file {Path(path)}")
