"""Preflight of an inference or training job: what it will write and allocate, checked before any compute.

Every evaluator (and recipe) calls these first, so a bad output folder, an absurd ``num_samples`` or an input whose
resampled grid would not fit fails in milliseconds with one line (:class:`~meddiff3d.errors.InputError`) and
nothing written. The memory estimates are deliberately simple: the arrays a job holds at its peak, counted from the
model's own meta (grid, channels) with the multipliers below, against :func:`meddiff3d.checks.check_memory`'s limit
(the memory available now, or ``MEDDIFF3D_MAX_MEMORY_GB``). They are bounds on the order of magnitude, not
predictions: a job they pass may still need more (e.g. the U-Net's own activations), a job they refuse would not fit.

==================================  =====================================================================================
:data:`FULL_RES_LIVE_ACTIVATIONS`   full-resolution activations a decoder / U-Net holds at once (3: input, output, skip)
:data:`REQUEST_BYTES`               Python bookkeeping per generation request (seed + covariates dict)
==================================  =====================================================================================
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.checks import check_memory, check_output_dir, check_voxels, safe_name
from meddiff3d.data.images import read_header
from meddiff3d.errors import InputError

__all__ = ["FULL_RES_LIVE_ACTIVATIONS", "REQUEST_BYTES", "output_file", "first_channels", "check_generation_job",
           "check_segmentation_job", "resampled_shape", "check_resampled_input", "check_inputs",
           "check_skull_stripped_inputs"]

FULL_RES_LIVE_ACTIVATIONS = 3
REQUEST_BYTES = 1024
_FLOAT = 4


def output_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as an output file: not a folder, its folder creatable and writable."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise InputError(f"{what} {path} is an existing folder, not a file")
    check_output_dir(path.parent, f"the folder of {what}")
    return path


def first_channels(meta: Mapping[str, Any], default: int = 64) -> int:
    """The channels of a network's full-resolution level (``meta["network"]["args"]["channels"][0]``)."""
    args = (meta.get("network") or {}).get("args") or {}
    channels = args.get("channels") or args.get("num_channels") or [default]
    return int(channels[0])


def check_generation_job(num_samples: int, batch_size: int, model_meta: Mapping[str, Any],
                         codec_meta: Mapping[str, Any] | None) -> int:
    """Memory of generating ``num_samples`` volumes: every latent is kept until decoding (plus its request), and one
    batch is decoded at a time at full resolution; returns the estimate in bytes."""
    latent = math.prod(int(s) for s in model_meta["latent"]["shape"]) * _FLOAT
    image = check_voxels("the generated image shape", model_meta["image"]["shape"])
    channels = first_channels(codec_meta or {}, 64)
    decode = batch_size * image * (channels * FULL_RES_LIVE_ACTIVATIONS + 1) * _FLOAT
    return check_memory(f"num_samples={num_samples} with batch_size={batch_size}",
                        num_samples * (latent + REQUEST_BYTES) + decode)


def check_segmentation_job(num_samples: int, batch_size: int | None, roi_size: Sequence[int] | None,
                           meta: Mapping[str, Any], input_voxels: int) -> int:
    """Memory of one case's ensemble: the N sampled masks (regions x model grid), the U-Net's full-resolution
    activations for a batch (of windows, with ``roi_size``) and the maps back on the input grid (3 maps x regions)."""
    grid = check_voxels("the model grid", meta["image"]["shape"])
    regions = len(meta.get("regions") or (0, 0, 0))
    batch = batch_size or num_samples
    window = grid if roi_size is None else min(grid, math.prod(int(r) for r in roi_size))
    activations = batch * window * first_channels(meta, 32) * FULL_RES_LIVE_ACTIVATIONS * _FLOAT
    samples = num_samples * regions * grid * _FLOAT
    maps = 3 * regions * int(input_voxels) * _FLOAT
    what = f"num_samples={num_samples}" + ("" if batch_size is None else f" with batch_size={batch_size}")
    return check_memory(f"{what} (segmentation ensemble)", samples + activations + maps)


def resampled_shape(shape: Sequence[int], affine: np.ndarray, spacing: Sequence[float]) -> tuple[int, ...]:
    """The grid an image of ``shape`` / ``affine`` is resampled to at ``spacing`` mm (MONAI ``Spacingd``)."""
    own = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return tuple(max(1, int(math.ceil(n * s / t))) for n, s, t in zip(shape, own, spacing))


def check_resampled_input(path: str | os.PathLike, shape: Sequence[int], affine: np.ndarray,
                          spacing: Sequence[float], channels: int = 1) -> int:
    """An input image's grid once resampled to the model ``spacing``: within the voxel cap and the memory limit
    (the resampled copy and the transforms' intermediate copies), before it is read; returns the voxels."""
    grid = resampled_shape(shape, affine, spacing)
    voxels = check_voxels(f"{path}: resampled to {tuple(float(s) for s in spacing)} mm, its grid", grid)
    check_memory(f"{path} (resampled to the model's {tuple(float(s) for s in spacing)} mm grid {grid})",
                 voxels * channels * _FLOAT * FULL_RES_LIVE_ACTIVATIONS)
    return voxels


def check_inputs(items: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike,
                 spacing: Sequence[float] | None = None) -> list[int]:
    """Before a detection / segmentation run: the output folder writable, every item id a safe file name (and
    unique), and - with the model ``spacing`` - every input's grid resampled to it within the caps; returns each
    item's voxels on its own grid (from the headers: nothing is read twice)."""
    check_output_dir(output_dir)
    seen: dict[str, int] = {}
    voxels = []
    for index, item in enumerate(items):
        case = safe_name("case id", item.get("id"))
        if case in seen:
            raise InputError(f"items {seen[case]} and {index} have the same case id {case!r} (their outputs would "
                             f"overwrite each other)")
        seen[case] = index
        image = item["image"]
        image = image[0] if isinstance(image, (list, tuple)) else image
        info = read_header(image)
        channels = len(item["image"]) if isinstance(item["image"], (list, tuple)) else 1
        if spacing is not None:
            check_resampled_input(info.path, info.shape, info.affine, spacing, channels)
        voxels.append(math.prod(info.shape))
    return voxels


def check_skull_stripped_inputs(items: Sequence[Mapping[str, Any]]) -> None:
    """Every item's (first) image is skull-stripped, as the T1 models expect
    (:func:`meddiff3d.data.brain_mask.check_skull_stripped`): an unstripped head stops the run before any compute,
    with an error naming the file."""
    from meddiff3d.data.brain_mask import check_skull_stripped
    from meddiff3d.data.images import read_image

    for item in items:
        image = item["image"]
        path = image[0] if isinstance(image, (list, tuple)) else image
        array, affine = read_image(path)
        check_skull_stripped(array, affine, str(path))
