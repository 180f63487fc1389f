"""Conditional segmentation diffusion (PatchDDM-style): the network, how its inputs are assembled, its file's meta.

The model denoises a multi-region tumour mask -- three channels WT, TC, ET (:data:`BRATS_REGIONS`), each a binary mask
mapped to [-1, 1] -- conditioned on the four MR sequences (t1, t1ce, t2, flair; z-scored) and on three coordinate
channels (``linspace(-1, 1)`` along each axis of the whole padded volume; PatchDDM, Bieder et al. 2023). The network is
MONAI's ``DiffusionModelUNet`` without attention, so it is fully convolutional: trained on patches (each patch with the
coordinates of its true position), it runs on the whole volume in one pass, or window by window with
:class:`~meddiff3d.diffusion.SlidingWindowNetwork` when memory is bounded.

Input channels, derived, never hard-coded: ``3 (noisy mask) + 4 (sequences) + CoordinateChannels.num_channels (3)``
= 10; in this order, assembled by wrappers (conditioning by name, :func:`conditioned_network`)::

    ConcatConditioning("image") -> [SlidingWindowNetwork] -> AppendCoordinates(full_shape) -> [Autocast] -> U-Net

File of a trained model (the engine's inference export, read with ``weights_only=True``)::

    {"format": "meddiff3d.inference/1", "iteration": int, "ema": state_dict,
     "meta": {"kind": "meddiff3d.segmentation_diffusion/1",
              "network": {"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}},
              "schedule": NoiseSchedule.to_dict(), "prediction": "epsilon" | "v" | "x0",
              "regions": ["WT", "TC", "ET"], "mask_range": [-1, 1],
              "modalities": ["t1", "t1ce", "t2", "flair"],
              "inputs": {"order": ["mask", "image", "coordinates"],
                         "channels": {"mask": 3, "image": 4, "coordinates": 3}},
              "coordinates": {"full_shape": [X, Y, Z], "range": [-1, 1]},
              "image": {"shape": [X, Y, Z], "spacing": [mm, mm, mm], "orientation": "RAS",
                        "normalisation": "zscore_nonzero_channelwise"},
              "patch": {"size": [...], "foreground_prob": p},
              "training": {...}}}
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.data.brats import BRATS_MODALITIES, BRATS_REGIONS
from meddiff3d.diffusion import (
    AppendCoordinates,
    ConcatConditioning,
    CoordinateChannels,
    NoiseSchedule,
    SlidingWindowNetwork,
)
from meddiff3d.engine.checkpoint import INFERENCE_FORMAT, build_network, kind_tag, save_file
from meddiff3d.errors import InputError

__all__ = [
    "SEGDIFF_KIND",
    "SEGDIFF_PRESETS",
    "SEGDIFF_SCHEDULE",
    "BRATS_MODALITIES",
    "segdiff_unet_spec",
    "network_divisor",
    "check_volume_shape",
    "segdiff_meta",
    "conditioned_network",
    "parameter_count",
    "binary_entropy",
    "ensemble_statistics",
    "save_untrained_model",
]

SEGDIFF_KIND = kind_tag("segmentation_diffusion")  # "segmentation_diffusion" in files written before that tag
#: the sequences the model is conditioned on, in channel order (the datalist's ``modalities``)
#: PatchDDM's schedule: linear betas 1e-4..2e-2 over T = 1000 (sampled with ~20 DDIM / DPM-Solver++ steps)
SEGDIFF_SCHEDULE = {"type": "NoiseSchedule", "schedule": "linear_beta", "num_train_timesteps": 1000,
                    "beta_start": 1e-4, "beta_end": 2e-2}

#: U-Net architectures without attention (channel counts are derived by :func:`segdiff_unet_spec`).
SEGDIFF_PRESETS: dict[str, dict[str, Any]] = {
    # PatchDDM's scale: 16.8 M parameters (10 input channels); trained on 128^3 patches on a GPU.
    "patchddm": {"channels": [32, 64, 128, 128], "attention_levels": [False, False, False, False],
                 "num_res_blocks": 2, "norm_num_groups": 32, "resblock_updown": False},
    # ~0.73 M parameters: CPU demos and tests on 2 mm (or coarser) grids.
    "tiny_cpu": {"channels": [8, 16, 32, 32], "attention_levels": [False, False, False, False],
                 "num_res_blocks": 1, "norm_num_groups": 8, "resblock_updown": False},
}  # fmt: skip


def segdiff_unet_spec(preset: str = "tiny_cpu", *, num_regions: int = len(BRATS_REGIONS),
                      num_modalities: int = len(BRATS_MODALITIES), coordinates: CoordinateChannels | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """``{"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}}`` of a segmentation diffusion U-Net.

    ``in_channels = num_regions + num_modalities + coordinates.num_channels`` (3 + 4 + 3), ``out_channels =
    num_regions``; ``preset`` names an architecture of :data:`SEGDIFF_PRESETS`, ``overrides`` replace its arguments
    (not the derived channel counts).
    """
    if preset not in SEGDIFF_PRESETS:
        raise InputError(f"unknown segmentation diffusion preset {preset!r}; valid: {', '.join(SEGDIFF_PRESETS)}")
    derived = ("spatial_dims", "in_channels", "out_channels", "with_conditioning", "cross_attention_dim")
    clash = [k for k in overrides if k in derived]
    if clash:
        raise InputError(f"network overrides {clash} are derived from the inputs and cannot be set")
    coords = coordinates if coordinates is not None else CoordinateChannels(spatial_dims=3)
    args = {"spatial_dims": 3, "in_channels": int(num_regions) + int(num_modalities) + coords.num_channels,
            "out_channels": int(num_regions), **SEGDIFF_PRESETS[preset], **overrides}
    levels = len(args["channels"])
    if any(args["attention_levels"]) or len(args["attention_levels"]) != levels:
        raise InputError("a PatchDDM network has no attention (it must run on patches and whole volumes alike): "
                         f"attention_levels must be {levels} x false, got {args['attention_levels']}")
    return {"class": "monai.networks.nets.DiffusionModelUNet", "args": args}


def network_divisor(spec: Mapping[str, Any]) -> int:
    """Every spatial size the U-Net sees must be a multiple of this (``2 ** (levels - 1)``)."""
    return 2 ** (len(spec["args"]["channels"]) - 1)


def check_volume_shape(shape: Sequence[int], spec: Mapping[str, Any], what: str = "volume shape") -> list[int]:
    """``shape`` as ints, or an :class:`InputError` if the U-Net cannot take it."""
    divisor = network_divisor(spec)
    shape = [int(s) for s in shape]
    if len(shape) != 3 or any(s < divisor or s % divisor for s in shape):
        raise InputError(f"{what} {shape} must be three multiples of {divisor} (the U-Net halves it "
                         f"{len(spec['args']['channels']) - 1} times)")
    return shape


def segdiff_meta(*, network: Mapping[str, Any], shape: Sequence[int], spacing: Sequence[float],
                 schedule: Mapping[str, Any] | None = None, prediction: str = "epsilon",
                 modalities: Sequence[str] = BRATS_MODALITIES, patch_size: Sequence[int] | None = None,
                 foreground_prob: float = 0.0, training: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The meta saved with a segmentation diffusion model (layout in the module docstring)."""
    shape = check_volume_shape(shape, network, "image shape")
    if patch_size is not None:
        patch_size = check_volume_shape(patch_size, network, "patch size")
        if any(p > s for p, s in zip(patch_size, shape)):
            raise InputError(f"patch size {patch_size} is larger than the image shape {shape}")
    coords = CoordinateChannels(shape)
    args = network["args"]
    channels = {"mask": len(BRATS_REGIONS), "image": len(modalities), "coordinates": coords.num_channels}
    if args["in_channels"] != sum(channels.values()) or args["out_channels"] != channels["mask"]:
        raise InputError(f"network in/out channels {args['in_channels']}/{args['out_channels']} do not fit the inputs "
                         f"{channels} (expected {sum(channels.values())}/{channels['mask']})")
    schedule = dict(schedule or SEGDIFF_SCHEDULE)
    NoiseSchedule.from_dict(schedule)  # validates
    return {
        "kind": SEGDIFF_KIND,
        "network": dict(network),
        "schedule": schedule,
        "prediction": prediction,
        "regions": list(BRATS_REGIONS),
        "mask_range": [-1.0, 1.0],
        "modalities": list(modalities),
        "inputs": {"order": ["mask", "image", "coordinates"], "channels": channels},
        "coordinates": {"full_shape": shape, "range": [-1.0, 1.0]},
        "image": {"shape": shape, "spacing": [float(s) for s in spacing], "orientation": "RAS",
                  "normalisation": "zscore_nonzero_channelwise"},
        "patch": {"size": list(patch_size or shape), "foreground_prob": float(foreground_prob)},
        "training": dict(training or {}),
    }


def conditioned_network(network: Callable[..., torch.Tensor], meta: Mapping[str, Any], *,
                        roi_size: Sequence[int] | None = None, overlap: float = 0.25, sw_batch_size: int = 1,
                        autocast: Callable[[Callable], Callable] | None = None) -> Callable[..., torch.Tensor]:
    """The network called as ``net(noisy_mask, timesteps=t, image=sequences[, patch_offset=corner])``.

    The sequences are concatenated by name, coordinates of the whole padded volume (``meta["coordinates"]``) are
    appended for the position ``patch_offset`` (absent: the input is the whole volume); with ``roi_size`` the
    network runs window by window (:class:`SlidingWindowNetwork`, Gaussian blending). ``autocast`` wraps the bare
    network (e.g. ``lambda net: Autocast(net, torch.bfloat16)``).
    """
    net = autocast(network) if autocast is not None else network
    net = AppendCoordinates(net, CoordinateChannels(meta["coordinates"]["full_shape"]))
    if roi_size is not None:
        roi = [int(r) for r in roi_size]
        check_volume_shape([min(r, s) for r, s in zip(roi, meta["image"]["shape"])], meta["network"],
                           "sliding-window roi_size")
        net = SlidingWindowNetwork(net, roi, overlap=overlap, sw_batch_size=sw_batch_size)
    return ConcatConditioning(net, "image")


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """``H(p) = -p log p - (1 - p) log(1 - p)`` in nats (0 at p = 0 and p = 1)."""
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    return np.nan_to_num(h, nan=0.0)


def ensemble_statistics(samples: torch.Tensor, mask_range: Sequence[float] = (-1.0, 1.0)) -> dict[str, torch.Tensor]:
    """Samples ``(N, R, *spatial)`` in ``mask_range`` -> ``{"prob", "variance", "entropy"}``, each ``(R, *spatial)``
    float32.

    ``prob`` = the share of the N members that vote for the region (a sample above the midpoint of ``mask_range``):
    a member's mask is a segmentation, its magnitude is not a probability (an under-trained model leaves healthy
    voxels at -0.8 instead of -1, which averaged as soft masks reads as p = 0.1 everywhere); ``variance`` = the
    population variance of the soft masks ``clip((x - low) / (high - low), 0, 1)`` (the uncertainty map of the
    research code: disagreement in magnitude as well as in vote); ``entropy`` = binary entropy of ``prob`` in nats
    (0 where all members agree, ``ln 2`` at an even split).
    """
    low, high = (float(v) for v in mask_range)
    x = samples.float()
    prob = (x > (low + high) / 2.0).float().mean(0)
    soft = ((x - low) / (high - low)).clamp(0.0, 1.0)
    variance = soft.var(0, unbiased=False) if soft.shape[0] > 1 else torch.zeros_like(prob)
    entropy = torch.from_numpy(binary_entropy(prob.numpy()).astype(np.float32))
    return {"prob": prob, "variance": variance, "entropy": entropy}


def parameter_count(spec: Mapping[str, Any]) -> int:
    """Number of parameters of the network ``spec`` describes (built on the CPU)."""
    return sum(p.numel() for p in build_network(spec).parameters())


def save_untrained_model(path: str | os.PathLike, *, shape: Sequence[int], spacing: Sequence[float],
                         preset: str = "tiny_cpu", prediction: str = "v", seed: int = 0,
                         **overrides: Any) -> Path:
    """Write a model file with random (seeded) weights -- for tests and memory / speed benchmarks.

    MONAI zero-initialises the U-Net's output layers; they are perturbed so the output depends on every input.
    """
    spec = segdiff_unet_spec(preset, coordinates=CoordinateChannels(shape), **overrides)
    meta = segdiff_meta(network=spec, shape=shape, spacing=spacing, prediction=prediction,
                        training={"note": "untrained (random weights)", "seed": int(seed)})
    torch.manual_seed(seed)
    net = build_network(spec)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return save_file({"format": INFERENCE_FORMAT, "iteration": 0, "ema": net.state_dict(), "meta": meta}, path)
