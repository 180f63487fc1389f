"""Segmentation by conditional diffusion: an ensemble of sampled tumour masks per case -> label map, probabilities and
uncertainty on the input grid (Wolleb et al. 2022 implicit ensembles; PatchDDM whole-volume or sliding-window runs).

Per case, as a chain of plain calls::

    brats_transforms(train=False)  -> sequences (4, *shape) on the model grid (RAS, model spacing, z-scored, padded)
    conditioned_network(net, meta[, roi_size]) -> make_denoiser(schedule, prediction) -> clamp x0 to [-1, 1]
    SAMPLERS[sampler](denoiser, noise (N, 3, *shape), timesteps, schedule, cond={"image": sequences})
    -> ensemble_statistics (probability, variance, entropy per region) -> to_input_grid -> regions_to_labels -> files

Sample ``i`` of a case starts from noise drawn with seed ``seed + i`` (on the CPU, so a seed gives the same sample on
every device); the N samples are denoised together in batches of ``batch_size``.

Output contract (for case ``<id>`` under ``output_dir`` ``OUT``; every file written atomically, all on the input
file's grid with its affine)::

    OUT/<id>/<id>_seg.nii.gz        uint8 BraTS labels 0/1/2/4 (derived from the nested WT/TC/ET decisions)
    OUT/<id>/<id>_prob.nii.gz       float32 (X, Y, Z, 3): mean probability per region, last axis WT, TC, ET
    OUT/<id>/<id>_variance.nii.gz   float32 (X, Y, Z, 3): variance of the samples' soft masks across the ensemble
    OUT/<id>/<id>_entropy.nii.gz    float32 (X, Y, Z, 3): binary entropy (nats) of the mean probability
    OUT/<id>/<id>_preview.png       FLAIR centre slices with the label map overlaid
    OUT/<id>/<id>_segdiff.json      settings, model hash, seconds, tumour volumes

A sample's soft mask is ``clip((x0 + 1) / 2, 0, 1)`` of its final denoised mask ``x0``; the probability is the ensemble
mean, so with N = 1 it is that sample's soft mask and the variance is 0.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.checks import check_choice, check_int, check_number, check_sizes
from meddiff3d.data.brats import BRATS_REGIONS, region_masks, regions_to_labels
from meddiff3d.data.datalist import load_datalist
from meddiff3d.data.transforms import brats_transforms, to_input_grid
from meddiff3d.diffusion import SAMPLERS, default_spacing, initial_noise, make_denoiser, sample, sampling_timesteps
from meddiff3d.diffusion import schedule_from_dict
from meddiff3d.engine.precision import Autocast, resolve_device, resolve_precision
from meddiff3d.models.loading import load_model
from meddiff3d.models.segdiff import check_volume_shape, conditioned_network, ensemble_statistics
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["ClampedDenoiser", "ensemble_statistics", "sample_masks", "segment",
           "output_paths", "write_case"]

#: label convention of the written label maps (0/1/2/4)
LABEL_CONVENTION = "brats2021"
FLAIR_CHANNEL = 3


class ClampedDenoiser:
    """Denoiser wrapper clamping ``x0_hat`` to the mask range ``[lo, hi]`` (the data never leaves it)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], lo: float = -1.0, hi: float = 1.0) -> None:
        self.denoiser, self.lo, self.hi = denoiser, float(lo), float(hi)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.denoiser(x, t, **cond).clamp(self.lo, self.hi)


def sample_masks(denoiser: Callable[..., torch.Tensor], image: torch.Tensor, meta: Mapping[str, Any], *,
                 num_samples: int, sampler: str = "ddim", steps: int = 20, spacing: str | None = None, seed: int = 0,
                 batch_size: int | None = None, callback: Callable | None = None) -> torch.Tensor:
    """``num_samples`` masks ``(N, 3, *shape)`` in [-1, 1] for one case's sequences ``image`` ``(1, 4, *shape)``."""
    schedule = schedule_from_dict(meta["schedule"])
    shape = [len(meta["regions"]), *image.shape[2:]]
    batch_size = batch_size or num_samples
    out = []
    for first in range(0, num_samples, batch_size):
        seeds = [seed + i for i in range(first, min(first + batch_size, num_samples))]
        noise = initial_noise(seeds, shape, image.device)
        cond = {"image": image.expand(len(seeds), *image.shape[1:])}
        out.append(sample(denoiser, noise, schedule, sampler=sampler, steps=steps, spacing=spacing, cond=cond,
                          generator=seeds[0], callback=callback))
    return torch.cat(out)


def output_paths(output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The files written for ``case_id`` (the output contract of the module docstring)."""
    folder = Path(output_dir) / str(case_id)
    names = {"seg": "seg.nii.gz", "prob": "prob.nii.gz", "variance": "variance.nii.gz", "entropy": "entropy.nii.gz",
             "preview": "preview.png", "info": "segdiff.json"}
    return {key: folder / f"{case_id}_{name}" for key, name in names.items()}


def _check_request(sampler: str, steps: Any, num_samples: Any, batch_size: Any, seed: Any, roi_size: Any,
                   overlap: Any, sw_batch_size: Any, threshold: Any) -> dict[str, Any]:
    check_choice("sampler", sampler, list(SAMPLERS))
    check_number("overlap", overlap, 0.0, 1.0, open_high=True)
    check_number("threshold", threshold, 0.0, 1.0, open_low=True, open_high=True)
    return {"steps": check_int("steps", steps, 1), "num_samples": check_int("num_samples", num_samples, 1),
            "seed": check_int("seed", seed, 0), "sw_batch_size": check_int("sw_batch_size", sw_batch_size, 1),
            "batch_size": None if batch_size is None else check_int("batch_size", batch_size, 1),
            "roi_size": check_sizes("roi_size", roi_size)}


def segment(
    model_path: str | os.PathLike,
    datalist: str | os.PathLike,
    *,
    section: str = "test",
    output_dir: str | os.PathLike = "outputs",
    num_samples: int = 5,
    sampler: str = "ddim",
    steps: int = 20,
    batch_size: int | None = None,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    threshold: float = 0.5,
    seed: int = 0,
    device: str = "auto",
    amp: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Segment every case of a datalist section; returns the case folders (contents: see module docstring).

    Args:
        model_path: a segmentation diffusion model file (``train_segmentation_diffusion``'s ``out``).
        datalist: datalist JSON whose items have the 4 sequences (t1, t1ce, t2, flair); labels are not needed.
        section: ``training``, ``validation`` or ``test``.
        num_samples: ensemble size N; sample ``i`` uses seed ``seed + i``.
        sampler, steps: a sampler of :data:`meddiff3d.diffusion.SAMPLERS` (``ddim`` or ``dpmpp_2m`` recommended) and
            its number of denoiser evaluations.
        batch_size: samples denoised together (default: all N at once).
        roi_size: ``None`` runs the network on the whole volume in one pass; a window size runs it window by window
            (MONAI sliding window, ``overlap``, Gaussian blending, ``sw_batch_size`` windows at a time).
        threshold: probability above which a voxel belongs to a region.
        device, amp: as in generation (``amp="auto"``: bf16 on CPUs with native bf16 and on GPUs).

    The request, the model and every image of the section (4 sequences, one grid, no NaN) are checked before
    anything is written; an :class:`InputError` names the bad value or file.
    """
    start = time.perf_counter()
    request = _check_request(sampler, steps, num_samples, batch_size, seed, roi_size, overlap, sw_batch_size, threshold)
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    model = load_model(model_path, "segmentation_diffusion", device=dev, dtype=dtype)  # bf16, channels-last: ~17 %
    network, meta = model.network, model.meta                                           # faster on CPU
    schedule = schedule_from_dict(meta["schedule"])
    sampling_timesteps(schedule, request["steps"], default_spacing(sampler))  # validates steps
    if request["roi_size"] is not None:
        clamped = [min(r, s) for r, s in zip(request["roi_size"], meta["image"]["shape"])]
        check_volume_shape(clamped, meta["network"], "sliding-window roi_size")
    items = load_datalist(datalist, section, modalities=len(meta["modalities"]))

    from monai.data import Dataset

    transform = brats_transforms(spacing=meta["image"]["spacing"], shape=meta["image"]["shape"], train=False,
                                 regions=False)
    net = conditioned_network(network, meta, roi_size=request["roi_size"], overlap=float(overlap),
                              sw_batch_size=request["sw_batch_size"], autocast=lambda n: Autocast(n, dtype))
    denoiser = ClampedDenoiser(make_denoiser(net, schedule, meta["prediction"]), *meta["mask_range"])
    settings = {"model": model.provenance(), "sampler": sampler,
                "steps": request["steps"], "num_samples": request["num_samples"], "seed": request["seed"],
                "timestep_spacing": default_spacing(sampler),
                "inference": "whole volume" if request["roi_size"] is None else
                {"sliding_window": {"roi_size": request["roi_size"], "overlap": float(overlap),
                                    "sw_batch_size": request["sw_batch_size"], "mode": "gaussian"}},
                "threshold": float(threshold), "regions": list(BRATS_REGIONS),
                "amp": str(dtype).replace("torch.", "") if dtype else "float32", "device": str(dev)}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"segmenting (N={request['num_samples']}, {sampler} {request['steps']})",
                   unit="case")
    written = []
    try:
        for item in Dataset([{"id": it["id"], "image": it["image"]} for it in items], transform):
            t0 = time.perf_counter()
            image = item["image"]
            samples = sample_masks(denoiser, image.as_tensor()[None].to(dev), meta,
                                   num_samples=request["num_samples"], sampler=sampler, steps=request["steps"],
                                   seed=request["seed"], batch_size=request["batch_size"])
            seconds = time.perf_counter() - t0
            stats = ensemble_statistics(samples.cpu())
            stats["flair"] = image.as_tensor()[FLAIR_CHANNEL:FLAIR_CHANNEL + 1]
            on_input = to_input_grid(stats, item, key="image", mode="bilinear")
            written.append(write_case(item["id"], on_input, output_dir, float(threshold),
                                      {**settings, "seconds_sampling": round(seconds, 3)}))
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()
    logger.info("segmented %d case(s) in %.1f s -> %s", len(written), time.perf_counter() - start, output_dir)
    return written


def write_case(case_id: str, maps: Mapping[str, Any], output_dir: str | os.PathLike, threshold: float,
               info: Mapping[str, Any]) -> Path:
    """Write one case's files (module docstring); ``maps`` are MetaTensors ``(C, *input_shape)`` on the input grid."""
    paths = output_paths(output_dir, case_id)
    affine = np.asarray(maps["prob"].affine, dtype=np.float64)
    channel_last = {k: np.moveaxis(np.asarray(maps[k], dtype=np.float32), 0, -1) for k in ("prob", "variance",
                                                                                              "entropy")}
    label = regions_to_labels(np.asarray(maps["prob"], dtype=np.float32), LABEL_CONVENTION, threshold)
    for key, array in channel_last.items():
        save_nifti(array, affine, paths[key], header_extra={"descrip": f"meddiff3d segdiff {key} WT,TC,ET"})
    save_nifti(label, affine, paths["seg"], dtype=np.uint8, header_extra={"descrip": "meddiff3d segdiff BraTS labels"})
    save_preview_png(np.asarray(maps["flair"][0], dtype=np.float32), paths["preview"], overlay=label,
                     title=f"{case_id} WT/TC/ET")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    volumes = {region: round(float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0, 3)
               for region, mask in region_masks(label, LABEL_CONVENTION).items()}
    mean_entropy = {region: round(float(channel_last["entropy"][..., i].mean()), 5)
                    for i, region in enumerate(BRATS_REGIONS)}
    save_json({"id": case_id, "files": {k: p.name for k, p in paths.items() if k != "info"}, **info,
               "tumour_volumes_ml": volumes, "mean_entropy_bits": mean_entropy,
               "shape": list(label.shape), "affine": affine.tolist()}, paths["info"])
    return paths["seg"].parent

