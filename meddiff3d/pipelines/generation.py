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

The bundle's MONAI components are what :func:`generate` is built from: ``network`` (the U-Net),
``autoencoder`` (the codec), :class:`~meddiff3d.pipelines.inferers.LatentDiffusionInferer` (sampler, steps,
guidance, decode strategy), :class:`~meddiff3d.pipelines.components.GenerationRequests` (the ``dataset``: seeds x
covariates) and :class:`GenerationEvaluator`, whose ``run()`` samples, decodes and writes.

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
from tqdm import tqdm

from meddiff3d.checks import check_int, check_output_dir
from meddiff3d.diffusion import initial_noise, sample, schedule_from_dict
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import (build_denoiser, check_codec_pair, check_guidance_support, covariate_vector,
                                  load_latent_diffusion, model_conditioning)
from meddiff3d.models.codec import LatentCodec, decode_progress, decode_steps
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.pipelines.components import GenerationRequests
from meddiff3d.pipelines.inferers import LatentDiffusionInferer, autocast_dtype
from meddiff3d.pipelines.preflight import check_generation_job
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["generate", "GenerationEvaluator", "write_sample", "preview_sampler"]


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
class GenerationEvaluator:
    """A bundle's generation ``evaluator``: ``run()`` samples every request of ``dataset`` (``{"seed", "covariates"}``
    items, :class:`~meddiff3d.pipelines.components.GenerationRequests`) with ``inferer`` over ``network``, decodes
    with ``autoencoder`` and writes each volume (:func:`write_sample`); returns the NIfTI paths.

    Args:
        network: the latent U-Net, on its device (readied for autocast or float32).
        autoencoder: the :class:`~meddiff3d.models.codec.LatentCodec` that decodes its latents.
        inferer: a :class:`~meddiff3d.pipelines.inferers.LatentDiffusionInferer` (sampler, steps, guidance, decode).
        model, codec: the loaded model files (:class:`~meddiff3d.models.loading.LoadedModel`), for the codec pairing
            check and the sidecars' provenance; optional.
        batch_size: samples denoised together.
        release_network: free the U-Net's weights once every latent is sampled (moved to the ``meta`` device, so
            the memory is returned even where a config parser still holds the module); peak memory is then the
            larger of sampling and decoding, not their sum. The evaluator (and that network) runs once then.
    """

    def __init__(self, network: torch.nn.Module, autoencoder: torch.nn.Module, inferer: LatentDiffusionInferer,
                 dataset: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, *,
                 model: LoadedModel | None = None, codec: LoadedModel | None = None, batch_size: int = 1,
                 check_pair: bool = True, release_network: bool = False, progress: bool = True) -> None:
        self.network, self.autoencoder, self.inferer, self.dataset = network, autoencoder, inferer, dataset
        self.output_dir, self.model, self.codec = Path(output_dir), model, codec
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.check_pair, self.release_network, self.progress = bool(check_pair), release_network, progress

    def _check(self, requests: Sequence[Mapping[str, Any]]) -> None:
        meta, source = self.inferer.meta, self.model.path if self.model is not None else "the diffusion model"
        if self.model is not None and self.codec is not None:
            check_codec_pair(self.codec, self.model, check_fingerprint=self.check_pair)
        for request in requests:
            conditional = request["covariates"] is not None
            if conditional and meta["conditioning"]["mode"] == "none":
                raise InputError(f"diffusion model {source} is unconditional; set covariates to None")
            check_guidance_support(meta, source, conditional=conditional, guidance_scale=self.inferer.guidance_scale)

    def _settings(self, covariates: Mapping[str, float] | None) -> dict[str, Any]:
        inferer, meta = self.inferer, self.inferer.meta
        conditional, dtype = covariates is not None, autocast_dtype(self.network)
        hashes = {}
        if self.model is not None:
            hashes["diffusion"] = self.model.provenance()
        if self.codec is not None:
            hashes["codec"] = {**self.codec.provenance(), "fingerprint": meta["codec"]["fingerprint"],
                               "pair_checked": self.check_pair}
        return {"covariates": covariates,
                "covariates_raw": None if covariates is None else
                raw_covariates(covariates, meta["conditioning"].get("scaling") or {}),
                "conditional": conditional, "sampler": inferer.sampler, "steps": inferer.steps,
                "denoiser_evaluations": 2 * inferer.steps - 1 if inferer.sampler == "heun" else inferer.steps,
                "timestep_spacing": inferer.spacing,
                "guidance_scale": inferer.guidance_scale if conditional else None,
                "amp": str(dtype).replace("torch.", "") if dtype else "float32",
                "device": str(next(self.network.parameters()).device), "models": hashes}

    def _batches(self, requests: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
        """Consecutive requests with the same covariates, at most ``batch_size`` at a time."""
        batches: list[list[Mapping[str, Any]]] = []
        for request in requests:
            last = batches[-1] if batches else None
            if last is not None and len(last) < self.batch_size and last[0]["covariates"] == request["covariates"]:
                last.append(request)
            else:
                batches.append([request])
        return batches

    def _decode_bar(self, latents: Sequence[tuple]) -> tqdm:
        """A tqdm bar over the decoder blocks of every decode (:func:`~meddiff3d.models.codec.decode_steps`)."""
        shown = self.progress and bool(latents) and isinstance(self.autoencoder, LatentCodec)
        tile = getattr(self.inferer, "decode_tile", getattr(self.autoencoder, "decode_tile", None))
        total = sum(decode_steps(self.autoencoder, job[1].shape, tile) for job in latents) if shown else 0
        return tqdm(total=total, unit="block", disable=not shown,
                    desc=f"decoding {sum(len(job[0]) for job in latents)} volume(s)")

    def run(self) -> list[Path]:
        start = time.perf_counter()
        if self.network is None or next(self.network.parameters()).is_meta:
            raise RuntimeError("this evaluator released its network after its first run (release_network=True)")
        check_output_dir(self.output_dir)  # before any compute: the folder, the memory of every latent and a decode
        check_generation_job(len(self.dataset), self.batch_size, self.inferer.meta,
                             self.codec.meta if self.codec is not None else None)
        requests = [self.dataset[i] for i in range(len(self.dataset))]
        self._check(requests)
        names = list(self.inferer.meta["conditioning"]["covariates"])
        network, device = self.network, next(self.network.parameters()).device
        jobs = []
        for batch in self._batches(requests):
            given = batch[0]["covariates"]
            cov = None if given is None else covariate_vector(given, names)
            given = None if given is None else {n: float(given[n]) for n in names}
            jobs.append(([int(r["seed"]) for r in batch], cov, self._settings(given)))
        # Two phases: sample every latent (small: 3x20x28x20 floats each), release the U-Net, then decode. Peak memory
        # is then the larger of the two phases, not their sum (anchor architecture: the U-Net's 1.1 GB of bf16 weights
        # are gone before the decoder's full-resolution activations are made).
        latents = []
        with tqdm(total=len(requests) * self.inferer.steps, unit="step", disable=not self.progress,
                  desc=f"generating ({self.inferer.sampler}, {self.inferer.steps} steps)") as bar:
            for seeds, cov, settings in jobs:
                noise = self.inferer.initial_noise(seeds, device)
                t0 = time.perf_counter()
                z = self.inferer.sample_latents(noise, network, cov, generator=seeds[0],
                                                callback=lambda *_, n=len(seeds): bar.update(n))
                latents.append((seeds, z, settings, time.perf_counter() - t0))
        if self.release_network:  # the provenance is in the settings: the U-Net goes with the last latent
            network.to_empty(device="meta")
            self.model = None
        del network
        image_meta, written = self.inferer.meta["image"], []
        with self._decode_bar(latents) as decode_bar:
            for seeds, z, settings, sampling_seconds in latents:
                t1 = time.perf_counter()
                with decode_progress(self.autoencoder, None if decode_bar.disable else decode_bar.update):
                    images = self.inferer.decode(self.autoencoder, z).float().cpu().numpy()
                timing = {"sampling": round(sampling_seconds / len(seeds), 3),
                          "decoding": round((time.perf_counter() - t1) / len(seeds), 3)}
                for s, image in zip(seeds, images):
                    written.append(write_sample(image[0], self.output_dir / f"sample_seed{s}", image_meta,
                                                {**settings, "seed": s, "seconds": timing}))
        logger.info("generated %d volume(s) in %.1f s -> %s", len(written), time.perf_counter() - start,
                    self.output_dir)
        return written


def generate(
    codec_path: str | os.PathLike,
    diffusion_path: str | os.PathLike,
    *,
    covariates: Mapping[str, float] | str | None = None,
    num_samples: int = 1,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float = 1.0,
    seed: int = 0,
    output_dir: str | os.PathLike = "outputs",
    device: str | torch.device = "auto",
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
        sampler: a name of :data:`meddiff3d.diffusion.SAMPLERS` (``ddim``, ``ddpm``, ``dpmpp_2m``, ``dpmpp_3m``, ``unipc``,
            ``euler``, ``heun``); ``None``: the model's own (:func:`meddiff3d.pipelines.inferers.model_sampling`).
        steps: denoiser evaluations of the main trajectory (``heun`` makes about twice as many); ``None``: the
            model's own.
        guidance_scale: classifier-free guidance ``w`` (1 = the conditional model, 0 = unconditional); ignored when
            unconditional.
        output_dir: where ``sample_seed{S}.nii.gz`` / ``.png`` / ``.json`` go (created).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a ``torch.device``).
        amp: ``"auto"`` (bf16 on CPUs with native bf16 and on GPUs), ``"bf16"``, ``"fp16"`` (CUDA), ``"none"``.
        decode_tile: latent tile size for tiled decoding (bounded memory), ``None`` decodes whole volumes.
        decode_split: decode in this many slabs with whole-volume GroupNorm statistics (same result as one pass up to
            rounding, less memory; see :func:`meddiff3d.models.codec.split_execution`).
        batch_size: samples denoised together.
        spacing: timestep spacing override (default per sampler, :data:`meddiff3d.diffusion.TIMESTEP_SPACING`); ``"monai"``
            (:data:`meddiff3d.diffusion.MONAI_SPACING`) steps as MONAI's ``DDIMScheduler`` does, for exact parity with a MONAI loop.
        check_pair: refuse a codec other than the one the model was trained with (fingerprint).

    The bundle's components, built from the two files: ``network`` (the U-Net), ``autoencoder`` (the codec),
    :class:`~meddiff3d.pipelines.inferers.LatentDiffusionInferer`,
    :class:`~meddiff3d.pipelines.components.GenerationRequests` and :class:`GenerationEvaluator`, which runs them.
    Every setting is validated, and both files are read, before anything is written; an :class:`InputError` names
    the bad value.
    """
    requests = GenerationRequests(covariates, num_samples, seed)
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    codec_file, diffusion = load_latent_diffusion(codec_path, diffusion_path, check_pair=check_pair, device=dev,
                                                  dtype=dtype)
    inferer = LatentDiffusionInferer(diffusion.meta, sampler, steps, guidance_scale, spacing=spacing,
                                     decode_tile=decode_tile, decode_split=decode_split)
    evaluator = GenerationEvaluator(diffusion.network, codec_file.network, inferer, requests, output_dir,
                                    model=diffusion, codec=codec_file, batch_size=batch_size, check_pair=check_pair,
                                    release_network=True, progress=progress)
    del diffusion
    return evaluator.run()

def write_sample(volume: np.ndarray, stem: Path, image_meta: Mapping[str, Any], sidecar: Mapping[str, Any]) -> Path:
    """``STEM.nii.gz`` (float32, the model's RAS affine), ``STEM.png`` (three orthogonal slices, radiological view,
    :func:`~meddiff3d.utils.io.save_preview_png`), ``STEM.json``."""
    if list(volume.shape) != list(image_meta["shape"]):
        raise RuntimeError(f"decoded shape {volume.shape} != the model's image shape {image_meta['shape']}")
    affine = np.asarray(image_meta["affine"], dtype=np.float64)
    nifti = save_nifti(volume.astype(np.float32), affine, stem.with_suffix(".nii.gz"),
                       header_extra={"descrip": f"meddiff3d brain_mri_ldm seed {sidecar.get('seed')}"})
    cov = sidecar.get("covariates")
    title = "unconditional" if cov is None else " ".join(f"{k[:3]}={v:.2f}" for k, v in cov.items())
    save_preview_png(volume, stem.with_suffix(".png"), affine=affine, title=f"seed {sidecar.get('seed')}: {title}",
                     notes=[f"{sidecar.get('sampler')}, {sidecar.get('steps')} steps"
                            + ("" if sidecar.get("guidance_scale") is None else
                               f", guidance {sidecar['guidance_scale']:g}")])
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
