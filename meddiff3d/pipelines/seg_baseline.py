"""Training and inference of the deterministic BraTS segmentation baseline (:mod:`meddiff3d.models.seg_baseline`:
the network spec, the meta, the loss and the loader).

* training (:func:`train_seg_baseline`): the validated datalist, :func:`~meddiff3d.data.transforms.brats_transforms`
  then random ``patch_size`` patches by the one patch sampler (:func:`~meddiff3d.pipelines.seg_training.
  patch_dataset`, optionally foreground-biased), as the diffusion model is trained; the engine (EMA, checkpoints,
  exact resume, TensorBoard) for a wall-clock budget (:class:`~meddiff3d.engine.WallClockBudget`, kept across
  resumes); the engine's inference export copied to ``out``;
* inference (:func:`segment`): MONAI sliding-window inference (Gaussian blending) on the training grid, sigmoid,
  back to the input grid (:func:`~meddiff3d.data.transforms.to_input_grid`, the input's affine), nested decoding to
  BraTS labels (:func:`~meddiff3d.data.brats.regions_to_labels`), written as the prediction contract of
  :mod:`meddiff3d.evaluation.segmentation`: ``OUT/<id>/<id>_seg.nii.gz`` and ``OUT/<id>/<id>_prob.nii.gz``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.checks import check_output_dir
from meddiff3d.data.brats import BRATS_REGIONS, regions_to_labels
from meddiff3d.engine import WallClockBudget, build_network, seed_everything, train
from meddiff3d.engine.recipes import publish_inference, training_summary
from meddiff3d.errors import InputError
from meddiff3d.models.loading import load_model
from meddiff3d.models.seg_baseline import (RegionDiceBCE, baseline_meta, baseline_spec, downsampling_factor,
                                           grid_shape)
from meddiff3d.pipelines.seg_training import patch_dataset
from meddiff3d.utils.io import save_nifti, save_vector_nifti
from meddiff3d.pipelines.preflight import output_file

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["train_seg_baseline", "predict_regions", "segment"]


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
    trains on whole volumes; ``foreground_prob`` is the share of patches centred on a tumour (WT) voxel (patches: the
one patch sampler, :func:`~meddiff3d.pipelines.seg_training.patch_dataset`). Writes ``out`` (the inference file) and
returns a summary dict.
    """
    from meddiff3d.data.datalist import load_datalist

    start = time.perf_counter()
    run_dir, out = check_output_dir(run_dir, "run_dir"), output_file(out, "out")  # before any compute
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
    data = patch_dataset([{k: item[k] for k in keep if k in item} for item in items], spacing=spacing, shape=shape,
                         patch_size=patch, foreground_prob=foreground_prob)
    seed_everything(seed)
    network = build_network(spec)
    budget = WallClockBudget(minutes)
    result = train(network, RegionDiceBCE(), data, run_dir=run_dir, max_iterations=max_iterations,
                   batch_size=min(batch_size, len(items)), lr=lr, weight_decay=weight_decay, ema_decay=ema_decay,
                   amp=amp, checkpoint_every=checkpoint_every, seed=seed, meta=meta, device=device,
                   log_every=log_every, progress=progress, handlers=[budget])
    publish_inference(result, out)
    return training_summary("segmentation baseline", result, out, start, train_seconds=round(budget.seconds, 1),
                            budget_seconds=budget.budget_seconds, num_volumes=len(items), shape=shape,
                            patch_size=patch)


# ------------------------------------------------------------------------------------------------------ inference
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

    loaded = load_model(model, "seg_baseline", device=device)
    network, meta = loaded.network, loaded.meta
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
        save_vector_nifti(prob, affine, folder / f"{case_id}_prob.nii.gz", names=BRATS_REGIONS)
        logger.info("%s: segmented in %.1f s -> %s", case_id, time.perf_counter() - start, folder)
        folders.append(folder)
    return folders
