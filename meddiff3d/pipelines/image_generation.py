"""Generating 2D images with an image diffusion model (:mod:`meddiff3d.models.image_diffusion`).

``generate_images(model, output_dir, num_samples=...)`` writes, per sample ``S`` (seed ``seed + i``),
``sample_seed{S}.nii.gz`` (float32 in [0, 1], the model's pixel spacing), ``sample_seed{S}.png`` (8-bit) and
``sample_seed{S}.json`` (settings, model hash, timing), and ``samples.png``, all of them side by side.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff3d.checks import check_int, check_number, check_output_dir
from meddiff3d.diffusion import initial_noise, sample
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import build_image_denoiser, class_labels, from_model_range
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.pipelines.inferers import SamplingSettings
from meddiff3d.utils.io import save_image_nifti, save_image_png, save_json

__all__ = ["generate_images"]


def generate_images(model: Any, output_dir: Any, *, num_samples: int = 4, class_name: str | None = None,
                    guidance_scale: float = 1.0, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                    batch_size: int = 8, device: str = "auto", amp: str = "auto",
                    progress: bool = True) -> list[Path]:
    """Sample ``num_samples`` images (see the module docstring); returns the NIfTI paths.

    ``class_name`` picks a class of a class-conditional model (``None``: unconditional, the null class);
    ``guidance_scale`` is classifier-free guidance towards it. Every setting and the model are checked, and the
    output folder made, before anything is computed.
    """
    num_samples = check_int("num_samples", num_samples, 1, 10_000)
    batch_size = check_int("batch_size", batch_size, 1, 1024)
    seed = check_int("seed", seed, 0)
    guidance_scale = check_number("guidance_scale", guidance_scale, 0, 100)
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "image_diffusion", device=dev, dtype=dtype)
    meta = loaded.meta
    sampling = SamplingSettings(meta, sampler, steps, None)  # None: the model's own (meta["sampling"])
    if class_name is None and guidance_scale != 1.0:
        raise InputError("guidance_scale needs a class (class_name) to guide towards")
    labels = class_labels([class_name], meta.get("classes") or [])
    out = check_output_dir(output_dir)
    denoiser = build_image_denoiser(loaded.network, meta, guidance_scale=guidance_scale, amp_dtype=dtype)
    shape, spacing = meta["image"]["shape"], meta["image"]["spacing"]
    seeds = list(range(seed, seed + num_samples))
    images, paths = [], []
    for first in tqdm(range(0, num_samples, batch_size), desc=f"generating {num_samples} image(s)",
                      disable=not progress):
        batch = seeds[first:first + batch_size]
        start = time.perf_counter()
        noise = initial_noise(batch, [1, *shape], dev)
        cond = {"class_labels": labels.expand(len(batch)).to(dev)} if meta.get("classes") else None
        with torch.no_grad():  # the generator: stochastic samplers draw reproducibly per batch
            x = sample(denoiser, noise, sampling.schedule, sampler=sampling.sampler, steps=sampling.steps,
                       spacing=sampling.spacing, cond=cond, generator=batch[0])
        seconds = (time.perf_counter() - start) / len(batch)
        for s, image in zip(batch, from_model_range(x[:, 0].float()).clamp(0, 1).cpu().numpy()):
            stem = out / f"sample_seed{s}"
            paths.append(save_image_nifti(image, spacing, stem.with_suffix(".nii.gz")))
            save_image_png(image, stem.with_suffix(".png"))
            save_json({"file": paths[-1].name, "seed": s, "class": class_name, "guidance_scale": guidance_scale,
                       **sampling.settings, "model": loaded.provenance(),
                       "image": {"shape": list(shape), "spacing": list(spacing), "range": [0, 1]},
                       "seconds_per_image": round(seconds, 3), "device": str(dev)}, stem.with_suffix(".json"))
            images.append(image)
    save_image_png(np.stack(images), out / "samples.png")
    return paths
