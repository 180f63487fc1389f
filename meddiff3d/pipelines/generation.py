"""Generation: a trained latent diffusion model + its codec -> NIfTI volumes with previews and sidecars.

The data flow is a chain of plain calls, each a wrapper or a pure function from :mod:`meddiff3d.diffusion`::

    network (EMA weights) -> Autocast (bf16 on capable CPUs / GPUs) -> [AppendCoordinates]
      -> ConcatConditioning("concat")
      -> make_denoiser(schedule, prediction) -> ClassifierFreeGuidance(scale, null condition)   [conditional only]
      -> meddiff3d.diffusion.sample(denoiser, noise, schedule, sampler, steps, cond=...)
      -> codec.decode (tiled if asked) -> NIfTI (the model's RAS affine) + PNG preview + JSON sidecar

Everything the chain needs comes from the two files: the diffusion model's meta (architecture, schedule, prediction,
covariate names and null value, conditioning mode, image geometry, the codec fingerprint it was trained with) and the
codec file (autoencoder, latent scale and shift). Nothing is recomputed.

Reproducibility: sample ``i`` starts from noise drawn with seed ``seed + i`` and is written as
``sample_seed{seed + i}.nii.gz``, so one sample of a batch can be regenerated alone (``seed=seed + i,
num_samples=1``); with ``batch_size=1`` (the default) this holds for the stochastic ``ddpm`` sampler too.
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

from meddiff3d.checks import check_choice, check_int, check_number, check_sizes, parse_covariates
from meddiff3d.diffusion import SAMPLERS, default_spacing, initial_noise, sample, sampling_timesteps, schedule_from_dict
from meddiff3d.engine.precision import AMP_CHOICES, resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import (build_denoiser, check_guidance_support, covariate_vector, load_latent_diffusion,
                                  model_conditioning)
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["generate", "check_request", "write_sample", "preview_sampler"]


def check_request(*, sampler: str, steps: Any, num_samples: Any, guidance_scale: Any, seed: Any, amp: str,
                  batch_size: Any, decode_tile: Any) -> dict[str, Any]:
    """Validate the generation settings that need no model; returns them normalised."""
    check_choice("sampler", sampler, list(SAMPLERS))
    check_choice("amp", amp, AMP_CHOICES, "values")
    return {"steps": check_int("steps", steps, 1), "num_samples": check_int("num_samples", num_samples, 1),
            "seed": check_int("seed", seed, 0), "batch_size": check_int("batch_size", batch_size, 1),
            "guidance_scale": check_number("guidance_scale", guidance_scale, 0.0),
            "decode_tile": check_sizes("decode_tile", decode_tile)}


def raw_covariates(values: Mapping[str, float], scaling: Mapping[str, Any]) -> dict[str, Any]:
    """Model-scale covariates back in their units, where the datalist documented the scaling."""
    raw = {}
    for name, value in values.items():
        s = scaling.get(name) or {}
        if "categories" in s and len(s["categories"]) > 1:
            raw[name] = s["categories"][int(round(value * (len(s["categories"]) - 1)))]
        elif "min" in s and "max" in s:
            raw[name] = round(s["min"] + value * (s["max"] - s["min"]), 3)
    return raw


# ------------------------------------------------------------------------------------------------ generate
def generate(
    codec_path: str | os.PathLike,
    diffusion_path: str | os.PathLike,
    *,
    covariates: Mapping[str, float] | str | None = None,
    num_samples: int = 1,
    sampler: str = "ddim",
    steps: int = 50,
    guidance_scale: float = 1.0,
    seed: int = 0,
    output_dir: str | os.PathLike = "outputs",
    device: str = "auto",
    amp: str = "auto",
    decode_tile: Sequence[int] | int | None = None,
    decode_split: int | None = None,
    batch_size: int = 1,
    spacing: str | None = None,
    check_pair: bool = True,
    progress: bool = True,
) -> list[Path]:
    """Generate ``num_samples`` T1 volumes; returns the NIfTI paths (a ``.png`` preview and a ``.json`` sidecar sit
    beside each).

    Args:
        codec_path, diffusion_path: the codec file and the diffusion model trained on its latents.
        covariates: ``{name: value in [0, 1]}`` for every covariate the model knows, or ``None`` (also ``{}``,
            ``"null"``, ``"none"``: forms a command line can pass) for unconditional sampling (the null condition the
            model was trained with, by conditioning dropout; refused for a model trained without it,
            ``meta["training"]["cond_dropout"] == 0``, as is ``guidance_scale != 1``).
        num_samples: volumes to write; sample ``i`` uses seed ``seed + i``.
        sampler: a name of :data:`meddiff3d.diffusion.SAMPLERS` (``ddim``, ``ddpm``, ``dpmpp_2m``, ``euler``, ``heun``).
        steps: denoiser evaluations of the main trajectory (``heun`` makes about twice as many).
        guidance_scale: classifier-free guidance ``w`` (1 = the conditional model, 0 = unconditional); ignored when
            unconditional.
        output_dir: where ``sample_seed{S}.nii.gz`` / ``.png`` / ``.json`` go (created).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        amp: ``"auto"`` (bf16 on CPUs with native bf16 and on GPUs), ``"bf16"``, ``"fp16"`` (CUDA), ``"none"``.
        decode_tile: latent tile size for tiled decoding (bounded memory), ``None`` decodes whole volumes.
        decode_split: decode in this many slabs with whole-volume GroupNorm statistics (same result as one pass up to
            rounding, less memory; see :func:`meddiff3d.models.codec.split_execution`).
        batch_size: samples denoised together.
        spacing: timestep spacing override (default per sampler, :data:`meddiff3d.diffusion.TIMESTEP_SPACING`); ``"monai"``
            (:data:`meddiff3d.diffusion.MONAI_SPACING`) steps as MONAI's ``DDIMScheduler`` does, for exact parity with a MONAI loop.
        check_pair: refuse a codec other than the one the model was trained with (fingerprint).

    Every setting is validated, and both files are read, before anything is written; an :class:`InputError` names
    the bad value.
    """
    start = time.perf_counter()
    request = check_request(sampler=sampler, steps=steps, num_samples=num_samples, guidance_scale=guidance_scale,
                            seed=seed, amp=amp, batch_size=batch_size, decode_tile=decode_tile)
    covariates = parse_covariates(covariates)
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    if decode_split is not None:
        decode_split = check_int("decode_split", decode_split, 1)
    codec_file, diffusion = load_latent_diffusion(codec_path, diffusion_path, check_pair=check_pair, device=dev,
                                                  dtype=dtype, decode_tile=request["decode_tile"],
                                                  decode_split=decode_split)
    network, meta, codec = diffusion.network, diffusion.meta, codec_file.network
    cond_meta = meta["conditioning"]
    names = list(cond_meta["covariates"])
    if covariates is not None and cond_meta["mode"] == "none":
        raise InputError(f"diffusion model {diffusion_path} is unconditional; set covariates to None")
    cov = None if covariates is None else covariate_vector(covariates, names)
    spacing = default_spacing(sampler, spacing)
    sampling_timesteps(schedule_from_dict(meta["schedule"]), request["steps"], spacing)  # validates steps, spacing
    conditional = cov is not None
    check_guidance_support(meta, diffusion_path, conditional=conditional, guidance_scale=request["guidance_scale"])
    given = None if cov is None else {n: float(covariates[n]) for n in names}
    denoiser = build_denoiser(network, meta, guidance_scale=request["guidance_scale"], conditional=conditional,
                              amp_dtype=dtype)

    out_dir, image_meta = Path(output_dir), meta["image"]
    hashes = {"diffusion": diffusion.provenance(),
              "codec": {**codec_file.provenance(), "fingerprint": meta["codec"]["fingerprint"],
                        "pair_checked": bool(check_pair)}}
    settings = {
        "covariates": given,
        "covariates_raw": None if given is None else raw_covariates(given, cond_meta.get("scaling") or {}),
        "conditional": conditional, "sampler": sampler, "steps": request["steps"],
        "denoiser_evaluations": request["steps"] * (2 if sampler == "heun" else 1),
        "timestep_spacing": spacing,
        "guidance_scale": request["guidance_scale"] if conditional else None,
        "amp": str(dtype).replace("torch.", "") if dtype else "float32", "device": str(dev), "models": hashes,
    }
    seeds = [request["seed"] + i for i in range(request["num_samples"])]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(seeds) * request["steps"], desc=f"generating ({sampler}, {request['steps']} steps)",
                   unit="step")
    # Two phases: sample every latent (small: 3x20x28x20 floats each), release the U-Net, then decode. Peak memory
    # is then the larger of the two phases, not their sum (anchor architecture: the U-Net's 1.1 GB of bf16 weights
    # are gone before the decoder's full-resolution activations are made).
    latents: list[tuple[list[int], torch.Tensor, float]] = []
    try:
        for first in range(0, len(seeds), request["batch_size"]):
            batch_seeds = seeds[first:first + request["batch_size"]]
            noise = initial_noise(batch_seeds, meta["latent"]["shape"], dev)
            cond = model_conditioning(meta, cov, len(batch_seeds), dev)
            callback = (lambda *_: bar.update(len(batch_seeds))) if bar is not None else None
            t0 = time.perf_counter()
            z = sample(denoiser, noise, schedule_from_dict(meta["schedule"]), sampler=sampler, steps=request["steps"],
                       spacing=spacing, cond=cond, generator=batch_seeds[0], callback=callback)
            latents.append((batch_seeds, z, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
    del denoiser, network, diffusion
    written: list[Path] = []
    for batch_seeds, z, sampling_seconds in latents:
        t1 = time.perf_counter()
        images = codec.decode(z).float().cpu().numpy()
        timing = {"sampling": round(sampling_seconds / len(batch_seeds), 3),
                  "decoding": round((time.perf_counter() - t1) / len(batch_seeds), 3)}
        for s, image in zip(batch_seeds, images):
            written.append(write_sample(image[0], out_dir / f"sample_seed{s}", image_meta,
                                        {**settings, "seed": s, "seconds": timing}))
    logger.info("generated %d volume(s) in %.1f s -> %s", len(written), time.perf_counter() - start, out_dir)
    return written


def write_sample(volume: np.ndarray, stem: Path, image_meta: Mapping[str, Any], sidecar: Mapping[str, Any]) -> Path:
    """``STEM.nii.gz`` (float32, the model's RAS affine), ``STEM.png`` (three orthogonal slices), ``STEM.json``."""
    if list(volume.shape) != list(image_meta["shape"]):
        raise RuntimeError(f"decoded shape {volume.shape} != the model's image shape {image_meta['shape']}")
    affine = np.asarray(image_meta["affine"], dtype=np.float64)
    nifti = save_nifti(volume.astype(np.float32), affine, stem.with_suffix(".nii.gz"),
                       header_extra={"descrip": f"meddiff3d brain_mri_ldm seed {sidecar.get('seed')}"})
    cov = sidecar.get("covariates")
    title = "unconditional" if cov is None else " ".join(f"{k[:3]}={v:.2f}" for k, v in cov.items())
    save_preview_png(volume, stem.with_suffix(".png"), title=f"seed {sidecar.get('seed')} {title}")
    geometry = {k: image_meta[k] for k in ("shape", "spacing", "affine")}
    save_json({"file": nifti.name, **sidecar, "image": {**geometry, "orientation": image_meta.get("orientation", "RAS")}},
              stem.with_suffix(".json"))
    return nifti


def preview_sampler(codec: str | os.PathLike | LoadedModel, meta: Mapping[str, Any], steps: int = 10,
                    covariate_value: float = 0.5) -> Callable[[torch.nn.Module], torch.Tensor]:
    """A training preview: ``fn(ema_network) -> decoded volume`` (DDIM, fixed noise, every covariate at 0.5)."""
    codec = (codec if isinstance(codec, LoadedModel) else load_model(codec, "codec")).network

    def preview(network: torch.nn.Module) -> torch.Tensor:
        device = next(network.parameters()).device
        n = len(meta["conditioning"]["covariates"])
        cov = torch.full((n,), covariate_value) if meta["conditioning"]["mode"] != "none" else None
        denoiser = build_denoiser(network, meta, conditional=cov is not None)
        z = sample(denoiser, initial_noise([0], meta["latent"]["shape"], device), schedule_from_dict(meta["schedule"]),
                   steps=steps, cond=model_conditioning(meta, cov, 1, device))
        return codec.to(device).decode(z)[0, 0]

    return preview
