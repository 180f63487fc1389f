"""The deterministic BraTS segmentation baseline: MONAI SegResNet, 4 sequences in, 3 sigmoid region channels out.

It answers "what does the diffusion model gain over a plain network trained on the same data for the same time?":

* data: the datalist validated by ``load_datalist(..., modalities=4, require_label=True)`` (3 sequences instead of
  4, sequences of different grids, a missing label: one error naming the file); :func:`~meddiff3d.data.transforms.
  brats_transforms` (RAS, ``spacing`` -- e.g. a coarse 2 mm grid on CPU --, z-score, pad/crop to ``shape``,
  labels -> WT/TC/ET channels), then random ``patch_size`` crops by the PatchDDM patch sampler
  (:class:`~meddiff3d.data.patches.RandPatchd`, optionally foreground-biased: ``foreground_prob``), as the diffusion
  model is trained;
* objective: :class:`RegionDiceBCE`, soft Dice (MONAI ``DiceLoss``) + binary cross-entropy per region channel,
  per sample. (MONAI's ``DiceCELoss`` applies a softmax cross-entropy to multi-channel inputs even with
  ``sigmoid=True``, which is wrong for nested regions; ``DiceFocalLoss(gamma=0)`` would be equivalent);
* training: the meddiff3d engine (:func:`~meddiff3d.engine.train`: EMA, checkpoints, exact resume, TensorBoard) for a
  wall-clock budget (:class:`~meddiff3d.engine.WallClockBudget`, kept across resumes);
* output: the engine's inference export (EMA weights + meta: network, spacing, shape, patch, normalisation,
  regions), read back with ``weights_only=True`` by :func:`load_baseline`;
* inference (:func:`segment`): MONAI sliding-window inference (Gaussian blending) on the training grid, sigmoid,
  back to the input grid (:func:`~meddiff3d.data.transforms.to_input_grid`, the input's affine), nested decoding to
  BraTS labels (:func:`~meddiff3d.data.brats.regions_to_labels`), written as the prediction contract of
  :mod:`meddiff3d.evaluation.segmentation`: ``OUT/<id>/<id>_seg.nii.gz`` and ``OUT/<id>/<id>_prob.nii.gz``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.data.brats import BRATS_REGIONS, regions_to_labels
from meddiff3d.errors import InputError
from meddiff3d.utils.io import atomic_path, save_nifti

logger = logging.getLogger("meddiff3d.models")

__all__ = ["PRESETS", "baseline_spec", "baseline_meta", "RegionDiceBCE", "grid_shape", "train_seg_baseline",
           "load_baseline", "predict_regions", "segment"]

KIND = "meddiff3d.brats_seg_baseline/1"
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


def _train_transforms(spacing, shape, patch_size, foreground_prob):
    from monai.transforms import Compose

    from meddiff3d.data.patches import RandPatchd
    from meddiff3d.data.transforms import brats_transforms

    if patch_size is None:
        return brats_transforms(spacing, shape, train=False)
    crop = RandPatchd(["image", "label"], patch_size, label_key="label", foreground_prob=foreground_prob)
    return Compose([brats_transforms(spacing, shape, train=False), crop])


def train_seg_baseline(
    datalist: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike,
    minutes: float,
    spacing: Sequence[float] = (2.0, 2.0, 2.0),
    shape: Sequence[int] | None = None,
    patch_size: Sequence[int] | None = (64, 64, 64),
    foreground_prob: float = 0.0,
    preset: str = "small",
    network_overrides: Mapping[str, Any] | None = None,
    batch_size: int = 2,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    ema_decay: float = 0.99,
    max_iterations: int = 10**9,
    checkpoint_every: int = 50,
    seed: int = 0,
    section: str = "training",
    device: str = "auto",
    amp: str = "none",
    log_every: int = 10,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the baseline for ``minutes`` of iteration time (or ``max_iterations`` steps, whichever comes first).

    Re-running with the same ``run_dir`` resumes (weights, optimiser, RNG, data position and the time used so far).
    ``shape`` defaults to the first item's field of view on ``spacing`` (:func:`grid_shape`); ``patch_size=None``
    trains on whole volumes; ``foreground_prob`` is the share of patches centred on a tumour (WT) voxel. Writes ``out`` (the inference file) and returns a summary dict.
    """
    from monai.data import CacheDataset

    from meddiff3d.data.datalist import load_datalist
    from meddiff3d.engine import WallClockBudget, build_network, seed_everything, train

    start = time.perf_counter()
    run_dir, out = Path(run_dir), Path(out)
    items = load_datalist(datalist, section, modalities=4, require_label=True)
    spec = baseline_spec(preset, **dict(network_overrides or {}))
    factor = downsampling_factor(spec)
    shape = list(shape) if shape is not None else grid_shape(items[0]["image"][0], spacing, factor)
    patch = list(patch_size) if patch_size is not None else None
    for name, size in (("shape", shape), ("patch_size", patch)):
        if size is not None and (len(size) != 3 or any(int(s) % factor for s in size)):
            raise InputError(f"{name} {size}: need 3 sizes, each a multiple of {factor} (the network's down-sampling)")
    if patch is not None and any(p > s for p, s in zip(patch, shape)):
        raise InputError(f"patch_size {patch} is larger than the grid {shape}")
    meta = baseline_meta(spec, spacing, shape, patch or shape, training={
        "datalist": str(datalist), "section": section, "num_volumes": len(items), "minutes": minutes,
        "patch_size": patch, "foreground_prob": foreground_prob, "batch_size": batch_size, "lr": lr, "seed": seed,
        "objective": "soft Dice + BCE per region"})
    keep = ("id", "image", "label", "convention")
    data = CacheDataset([{k: item[k] for k in keep if k in item} for item in items],
                        _train_transforms(spacing, shape, patch, foreground_prob), progress=False, num_workers=0)
    seed_everything(seed)
    network = build_network(spec)
    budget = WallClockBudget(minutes)
    result = train(network, RegionDiceBCE(), data, run_dir=run_dir, max_iterations=max_iterations,
                   batch_size=min(batch_size, len(items)), lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
                   amp=amp, checkpoint_every=checkpoint_every, seed=seed, meta=meta, device=device,
                   log_every=log_every, progress=progress, handlers=[budget])
    if int(os.environ.get("RANK", 0)) == 0:
        with atomic_path(out) as tmp:
            shutil.copyfile(result.inference, tmp)
    summary = {"out": str(out), "iteration": result.iteration, "resumed_from": result.resumed_from,
               "last_loss": result.last_loss, "train_seconds": round(budget.seconds, 1),
               "budget_seconds": budget.budget_seconds, "num_volumes": len(items), "shape": shape, "patch_size": patch,
               "parameters": sum(p.numel() for p in result.network.parameters()),
               "seconds": round(time.perf_counter() - start, 1)}
    logger.info("segmentation baseline: %s", summary)
    return summary


# ------------------------------------------------------------------------------------------------------ inference
def load_baseline(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(network in eval mode, meta)`` from an inference file (read with ``weights_only=True``)."""
    from meddiff3d.engine import load_network

    network, meta = load_network(path, map_location=device)
    if meta.get("kind") != KIND:
        raise InputError(f"{path}: not a segmentation baseline model (kind {meta.get('kind')!r}, expected {KIND!r})")
    return network.to(device), meta


@torch.no_grad()
def predict_regions(network: torch.nn.Module, image: torch.Tensor, meta: Mapping[str, Any],
                    sw_batch_size: int = 1) -> torch.Tensor:
    """Region probabilities ``(3, *spatial)`` of one preprocessed image ``(4, *spatial)`` (sliding window)."""
    from monai.inferers import sliding_window_inference

    settings = meta["inference"]
    device = next(network.parameters()).device
    x = torch.as_tensor(image).as_subclass(torch.Tensor)[None].to(device)
    logits = sliding_window_inference(x, roi_size=settings["roi_size"], sw_batch_size=sw_batch_size,
                                      predictor=network, overlap=settings["overlap"], mode=settings["blend"])
    return torch.sigmoid(torch.as_tensor(logits).as_subclass(torch.Tensor))[0].cpu()


def segment(model: str | os.PathLike, datalist: str | os.PathLike, out_dir: str | os.PathLike, *,
            section: str = "test", device: str = "cpu", sw_batch_size: int = 1) -> list[Path]:
    """Segment every item of ``datalist[section]`` into ``out_dir`` (prediction contract; returns the case folders).

    Labels are written in the datalist's ``label_convention`` (brats2021 if it declares none).
    """
    from meddiff3d.data.datalist import load_datalist
    from meddiff3d.data.transforms import brats_transforms, to_input_grid

    network, meta = load_baseline(model, device)
    items = load_datalist(datalist, section, modalities=meta["image"]["modalities"], check_images="header")
    transform = brats_transforms(meta["image"]["spacing"], meta["image"]["shape"], train=False)
    threshold = float(meta["inference"]["threshold"])
    folders = []
    for item in items:
        case_id = str(item["id"])
        start = time.perf_counter()
        data = transform({"image": item["image"]})
        probs = predict_regions(network, data["image"], meta, sw_batch_size)
        on_input = to_input_grid(probs, data, mode="bilinear")
        affine = np.asarray(on_input.affine, np.float64)
        prob = on_input.as_tensor().clamp(0.0, 1.0).numpy()
        labels = regions_to_labels(prob, item.get("convention") or "brats2021", threshold)
        folder = Path(out_dir) / case_id
        save_nifti(labels, affine, folder / f"{case_id}_seg.nii.gz", dtype=np.uint8)
        save_nifti(np.moveaxis(prob, 0, -1), affine, folder / f"{case_id}_prob.nii.gz", dtype=np.float32)
        logger.info("%s: segmented in %.1f s -> %s", case_id, time.perf_counter() - start, folder)
        folders.append(folder)
    return folders
