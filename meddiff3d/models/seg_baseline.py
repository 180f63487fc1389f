"""The deterministic BraTS segmentation baseline: MONAI SegResNet, 4 sequences in, 3 sigmoid region channels out.

It answers "what does the diffusion model gain over a plain network trained on the same data for the same time?".
This module holds the network side: the SegResNet presets (:func:`baseline_spec`), the training grid
(:func:`grid_shape`), the meta saved with the weights (:func:`baseline_meta`), and the objective. Training
and inference are :mod:`meddiff3d.pipelines.seg_baseline`.

* objective: :class:`RegionDiceBCE`, soft Dice (MONAI ``DiceLoss``) + binary cross-entropy per region channel,
  per sample. (MONAI's ``DiceCELoss`` applies a softmax cross-entropy to multi-channel inputs even with
  ``sigmoid=True``, which is wrong for nested regions; ``DiceFocalLoss(gamma=0)`` would be equivalent);
* output of training: the engine's inference export (EMA weights + meta: network, spacing, shape, patch,
  normalisation, regions), read back with ``weights_only=True`` by :func:`meddiff3d.models.loading.load_model` ``(path, "seg_baseline")``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from meddiff3d.data.brats import BRATS_REGIONS
from meddiff3d.engine.checkpoint import kind_tag
from meddiff3d.errors import InputError

__all__ = ["KIND", "PRESETS", "baseline_spec", "baseline_meta", "downsampling_factor", "RegionDiceBCE", "grid_shape"]

KIND = kind_tag("seg_baseline")  # "meddiff3d.brats_seg_baseline/1" in files written before that tag
#: SegResNet arguments per preset; ``brats`` is MONAI's BraTS tutorial network, ``tiny`` fits CPU tests
PRESETS = {
    "brats": {"init_filters": 16, "blocks_down": [1, 2, 2, 4], "blocks_up": [1, 1, 1], "dropout_prob": 0.2},
    "small": {"init_filters": 8, "blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1]},
    "tiny": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
}


def baseline_spec(preset: str = "small", **overrides: Any) -> dict[str, Any]:
    """The ``{"class", "args"}`` spec of a SegResNet preset: 4 input sequences, 3 region logits."""
    if preset not in PRESETS:
        raise InputError(f"unknown baseline preset {preset!r}; choose one of {sorted(PRESETS)}")
    args = {"spatial_dims": 3, "in_channels": 4, "out_channels": len(BRATS_REGIONS), **PRESETS[preset], **overrides}
    return {"class": "monai.networks.nets.SegResNet", "args": args}


def downsampling_factor(spec: Mapping[str, Any]) -> int:
    """Spatial sizes fed to the network must be multiples of this (2 per down-sampling level)."""
    return 2 ** (len(spec["args"].get("blocks_down", PRESETS["small"]["blocks_down"])) - 1)


class RegionDiceBCE(torch.nn.Module):
    """``objective(network, batch) -> per-sample loss (B,)``: mean over regions of soft Dice + BCE on the logits.

    ``batch["image"]``: ``(B, 4, *spatial)``; ``batch["label"]``: ``(B, 3, *spatial)`` binary WT/TC/ET.
    """

    def __init__(self, lambda_dice: float = 1.0, lambda_bce: float = 1.0) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)
        self.lambda_dice, self.lambda_bce = float(lambda_dice), float(lambda_bce)

    def forward(self, network: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = network(batch["image"])
        target = batch["label"].to(logits.dtype)
        dims = tuple(range(1, logits.ndim))
        dice = self.dice(logits, target).flatten(1).mean(1)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
        return self.lambda_dice * dice + self.lambda_bce * bce


def grid_shape(image_file: str | os.PathLike, spacing: Sequence[float], multiple: int = 8) -> list[int]:
    """The training grid for ``spacing``: the field of view of ``image_file`` in voxels of ``spacing``, each axis
    rounded up to a multiple of ``multiple`` (the network's down-sampling factor)."""
    from meddiff3d.data.images import read_header

    info = read_header(image_file)
    extent = np.asarray(info.shape, np.float64) * np.asarray(info.spacing, np.float64)
    voxels = np.ceil(extent / np.asarray(spacing, np.float64) - 1e-6)
    return [int(math.ceil(v / multiple) * multiple) for v in voxels]


def baseline_meta(spec: Mapping[str, Any], spacing: Sequence[float], shape: Sequence[int], roi_size: Sequence[int],
                  overlap: float = 0.5, threshold: float = 0.5, training: Mapping[str, Any] | None = None) -> dict:
    """Everything inference needs, saved with the weights: network, grid, normalisation, sliding window, threshold."""
    return {
        "kind": KIND, "network": dict(spec), "regions": list(BRATS_REGIONS),
        "image": {"modalities": 4, "spacing": [float(s) for s in spacing], "shape": [int(s) for s in shape],
                  "orientation": "RAS", "normalisation": "z-score per channel over non-zero voxels"},
        "inference": {"roi_size": [int(s) for s in roi_size], "overlap": float(overlap), "blend": "gaussian",
                      "threshold": float(threshold)},
        "training": dict(training or {}),
    }


# ------------------------------------------------------------------------------------------------------ loading
