"""MONAI inferers over the project's sampler library: what a bundle config names as its ``inferer``.

In the spirit of MONAI's ``DiffusionInferer`` / ``LatentDiffusionInferer`` (which take the noise scheduler when built
and are called with a network), each inferer here is built from the model file's meta (noise schedule, prediction
type, conditioning) and its sampling settings, and called as ``inferer(inputs, network, ...)``. The sampling itself is
:func:`meddiff3d.diffusion.sample` over the network wrapped into a denoiser (never a loop of its own)::

    LatentDiffusionInferer(meta, sampler, steps, guidance_scale, decode_tile, decode_split)
        (noise, network, autoencoder_model, conditioning)  -> images   (the latent U-Net, then codec.decode)
    DiffusionSegmentationInferer(meta, num_samples, sampler, steps, seed, batch_size, roi_size, overlap, sw_batch_size)
        (image, network)                                  -> N sampled masks (the ensemble)
    ImageDiffusionInferer(meta, sampler, steps, guidance_scale, spacing)
        (noise, network, class_labels)                    -> images in the model range (pixel space, 2D)
        .posterior(noise, network, operator, y, ...)      -> posterior samples given a measurement y = A x + noise

Precision follows the network: a network readied for autocast
(:func:`~meddiff3d.engine.precision.prepare_for_inference`, weights stored in bf16 / fp16) runs under autocast to that
dtype; a float32 network runs in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from meddiff3d.checks import check_choice, check_int, check_number, check_sizes
from meddiff3d.diffusion import (SAMPLERS, DataConsistency, default_spacing, initial_noise, make_denoiser, sample,
                                 sampling_timesteps)
from meddiff3d.diffusion import schedule_from_dict
from meddiff3d.engine.precision import AUTOCAST_LOW_PRECISION_LAYERS, Autocast
from meddiff3d.models.image_diffusion import build_image_denoiser
from meddiff3d.models.ldm import build_denoiser, model_conditioning
from meddiff3d.models.segdiff import check_volume_shape, conditioned_network

__all__ = ["DEFAULT_SAMPLING", "model_sampling", "SamplingSettings", "autocast_dtype", "ClampedDenoiser",
           "sample_masks", "LatentDiffusionInferer", "DiffusionSegmentationInferer", "ImageDiffusionInferer"]


def autocast_dtype(network: torch.nn.Module) -> torch.dtype | None:
    """The dtype a network's convolution / linear weights are stored in for autocast
    (:func:`~meddiff3d.engine.precision.store_for_autocast`); ``None``: float32, no autocast."""
    layer = next((m for m in network.modules() if isinstance(m, AUTOCAST_LOW_PRECISION_LAYERS)), None)
    dtype = None if layer is None else layer.weight.dtype
    return None if dtype in (None, torch.float32) else dtype


class ClampedDenoiser:
    """Denoiser wrapper clamping ``x0_hat`` to the mask range ``[lo, hi]`` (the data never leaves it)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], lo: float = -1.0, hi: float = 1.0) -> None:
        self.denoiser, self.lo, self.hi = denoiser, float(lo), float(hi)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self.denoiser(x, t, **cond).clamp(self.lo, self.hi)


def sample_masks(denoiser: Callable[..., torch.Tensor], image: torch.Tensor, meta: Mapping[str, Any], *,
                 num_samples: int, sampler: str = "ddim", steps: int = 20, spacing: str | None = None, seed: int = 0,
                 batch_size: int | None = None, callback: Callable | None = None) -> torch.Tensor:
    """``num_samples`` masks ``(N, 3, *shape)`` in [-1, 1] for one case's sequences ``image`` ``(1, 4, *shape)``;
    sample ``i`` starts from noise seeded with ``seed + i``, ``batch_size`` samples are denoised together."""
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


#: how a model is sampled when neither the config nor the model file's meta ``"sampling"`` says, per schedule type
#: (flow: DPM-Solver++(2M) reached the exact sampler's floor at 8-10 steps on the toy mixture of tests/toy_mixture.py)
DEFAULT_SAMPLING = {"NoiseSchedule": {"sampler": "ddim", "steps": 50},
                    "FlowSchedule": {"sampler": "dpmpp_2m", "steps": 10}}


def model_sampling(meta: Mapping[str, Any]) -> dict[str, Any]:
    """How the model of ``meta`` is meant to be sampled: ``{"sampler", "steps"[, "spacing"]}`` from its meta's
    ``"sampling"`` (written by the recipe that made it, e.g. a distilled student's grid), else
    :data:`DEFAULT_SAMPLING` for its schedule type."""
    kind = dict(meta["schedule"]).get("type", "NoiseSchedule")
    return {**DEFAULT_SAMPLING.get(kind, DEFAULT_SAMPLING["NoiseSchedule"]), **dict(meta.get("sampling") or {})}


class SamplingSettings:
    """Sampler name, steps and timestep spacing, validated against the model's schedule when built; a ``None``
    sampler or steps is the model's own (:func:`model_sampling`), as is its spacing when the sampler is."""

    def __init__(self, meta: Mapping[str, Any], sampler: str | None, steps: Any, spacing: str | None) -> None:
        own = model_sampling(meta)
        if sampler is None:
            sampler, spacing = own["sampler"], spacing if spacing is not None else own.get("spacing")
        steps = own["steps"] if steps is None else steps
        check_choice("sampler", sampler, list(SAMPLERS))
        self.meta = meta
        self.schedule = schedule_from_dict(meta["schedule"])
        self.sampler, self.steps = sampler, check_int("steps", steps, 1)
        self.spacing = default_spacing(sampler, spacing, self.schedule)
        sampling_timesteps(self.schedule, self.steps, self.spacing)  # validates steps against the schedule

    @property
    def settings(self) -> dict[str, Any]:
        """For sidecars."""
        return {"sampler": self.sampler, "steps": self.steps, "timestep_spacing": self.spacing}


class LatentDiffusionInferer(Inferer, SamplingSettings):
    """Sample latents with the latent U-Net, then decode them with the codec (a
    :class:`~meddiff3d.models.codec.LatentCodec`, latent scale/shift inside).

    Args:
        meta: the latent diffusion model file's meta (schedule, prediction, conditioning, latent shape).
        sampler, steps: a sampler of :data:`meddiff3d.diffusion.SAMPLERS` and its denoiser evaluations; ``None``:
            the model's own (:func:`model_sampling`: its meta's ``"sampling"``, else :data:`DEFAULT_SAMPLING`).
        guidance_scale: classifier-free guidance (1: the conditional model); used with conditioning only.
        spacing: timestep spacing override (default per sampler; ``"monai"``: MONAI ``DDIMScheduler`` stepping).
        decode_tile: decode strategy: latent tile size for tiled decoding (``None``: whole volume in one pass);
            ``decode_split``: decode in this many slabs with whole-volume GroupNorm statistics.
    """

    def __init__(self, meta: Mapping[str, Any], sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float = 1.0,
                 spacing: str | None = None, decode_tile: Sequence[int] | int | None = None,
                 decode_split: int | None = None) -> None:
        Inferer.__init__(self)
        SamplingSettings.__init__(self, meta, sampler, steps, spacing)
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        self.decode_tile = check_sizes("decode_tile", decode_tile)
        self.decode_split = None if decode_split is None else check_int("decode_split", decode_split, 1)

    def denoiser(self, network: torch.nn.Module, conditional: bool) -> Callable[..., torch.Tensor]:
        """The network as the samplers' denoiser (:func:`meddiff3d.models.ldm.build_denoiser`)."""
        return build_denoiser(network, self.meta, guidance_scale=self.guidance_scale, conditional=conditional,
                              amp_dtype=autocast_dtype(network))

    def sample_latents(self, input_noise: torch.Tensor, diffusion_model: torch.nn.Module,
                       conditioning: torch.Tensor | None = None, *, generator: int | None = None,
                       callback: Callable | None = None) -> torch.Tensor:
        """Latents from ``input_noise`` ``(B, *latent_shape)``; ``conditioning``: covariates ``(n,)`` in the model's
        order, or ``None`` for the null condition (unconditional)."""
        cond = model_conditioning(self.meta, conditioning, input_noise.shape[0], input_noise.device)
        denoiser = self.denoiser(diffusion_model, conditional=conditioning is not None)
        return sample(denoiser, input_noise, self.schedule, sampler=self.sampler, steps=self.steps,
                      spacing=self.spacing, cond=cond, generator=generator, callback=callback)

    @contextlib.contextmanager
    def _decode_strategy(self, codec: Any) -> Iterator[Any]:
        saved = codec.decode_tile, codec.split
        codec.decode_tile = tuple(self.decode_tile) if self.decode_tile else None
        codec.split = self.decode_split
        try:
            yield codec
        finally:
            codec.decode_tile, codec.split = saved

    @torch.no_grad()
    def decode(self, autoencoder_model: Any, z: torch.Tensor) -> torch.Tensor:
        """Images from latents, with this inferer's decode strategy."""
        with self._decode_strategy(autoencoder_model) as codec:
            return codec.decode(z)

    def __call__(self, inputs: torch.Tensor, network: Callable, autoencoder_model: Any = None,  # type: ignore[override]
                 conditioning: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``inputs``: initial noise ``(B, *latent_shape)``; returns decoded images (latents without a codec)."""
        z = self.sample_latents(inputs, network, conditioning, **kwargs)
        return z if autoencoder_model is None else self.decode(autoencoder_model, z)

    def initial_noise(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """One latent-shaped standard-normal tensor per seed (:func:`meddiff3d.diffusion.initial_noise`)."""
        return initial_noise(seeds, self.meta["latent"]["shape"], device)


class DiffusionSegmentationInferer(Inferer, SamplingSettings):
    """An ensemble of ``num_samples`` masks for one case's sequences, from a segmentation diffusion network
    (PatchDDM: whole volume in one pass, or window by window with ``roi_size``).

    Args:
        meta: the segmentation diffusion model file's meta (schedule, prediction, regions, coordinates, geometry).
        num_samples: ensemble size N; sample ``i`` starts from noise seeded with ``seed + i``.
        sampler, steps, spacing: as :class:`LatentDiffusionInferer`.
        batch_size: samples denoised together (``None``: all N at once).
        roi_size, overlap, sw_batch_size: MONAI sliding window (Gaussian blending); ``None``: whole volume.
    """

    def __init__(self, meta: Mapping[str, Any], num_samples: int = 5, sampler: str = "ddim", steps: int = 20,
                 seed: int = 0, batch_size: int | None = None, roi_size: Sequence[int] | int | None = None,
                 overlap: float = 0.25, sw_batch_size: int = 1, spacing: str | None = None) -> None:
        Inferer.__init__(self)
        SamplingSettings.__init__(self, meta, sampler, steps, spacing)
        self.overlap = check_number("overlap", overlap, 0.0, 1.0, open_high=True)
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.seed = check_int("seed", seed, 0)
        self.batch_size = None if batch_size is None else check_int("batch_size", batch_size, 1)
        self.sw_batch_size = check_int("sw_batch_size", sw_batch_size, 1)
        self.roi_size = check_sizes("roi_size", roi_size)
        if self.roi_size is not None:
            clamped = [min(r, s) for r, s in zip(self.roi_size, meta["image"]["shape"])]
            check_volume_shape(clamped, meta["network"], "sliding-window roi_size")

    @property
    def settings(self) -> dict[str, Any]:
        window = {"roi_size": self.roi_size, "overlap": self.overlap, "sw_batch_size": self.sw_batch_size,
                  "mode": "gaussian"}
        return {**super().settings, "num_samples": self.num_samples, "seed": self.seed,
                "inference": "whole volume" if self.roi_size is None else {"sliding_window": window}}

    def denoiser(self, network: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """Network -> conditioned (sequences, coordinates[, sliding window]) -> denoiser -> clamp to the mask range."""
        dtype = autocast_dtype(network)
        net = conditioned_network(network, self.meta, roi_size=self.roi_size, overlap=self.overlap,
                                  sw_batch_size=self.sw_batch_size, autocast=lambda n: Autocast(n, dtype))
        return ClampedDenoiser(make_denoiser(net, self.schedule, self.meta["prediction"]), *self.meta["mask_range"])

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any,  # type: ignore[override]
                 callback: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        """``inputs``: the sequences ``(1, 4, *shape)`` on the model grid; returns masks ``(N, 3, *shape)`` in
        [-1, 1]."""
        return sample_masks(self.denoiser(network), inputs, self.meta, num_samples=self.num_samples,
                            sampler=self.sampler, steps=self.steps, spacing=self.spacing, seed=self.seed,
                            batch_size=self.batch_size, callback=callback)


class ImageDiffusionInferer(Inferer, SamplingSettings):
    """Images from noise with a pixel-space image diffusion network (:mod:`meddiff3d.models.image_diffusion`); with
    a measurement, posterior samples (:meth:`posterior`).

    Args:
        meta: the image diffusion model file's meta (schedule, prediction, classes, image size).
        sampler, steps, spacing: as :class:`LatentDiffusionInferer` (``None``: the model's own sampling).
        guidance_scale: classifier-free guidance towards the requested class (1: the conditional model); needs a
            class-conditional model.
    """

    def __init__(self, meta: Mapping[str, Any], sampler: str | None = None, steps: int | None = None,
                 guidance_scale: float = 1.0, spacing: str | None = None) -> None:
        Inferer.__init__(self)
        SamplingSettings.__init__(self, meta, sampler, steps, spacing)
        self.guidance_scale = check_number("guidance_scale", guidance_scale, 0.0, 100.0)
        build_image_denoiser(torch.nn.Identity(), meta, guidance_scale=self.guidance_scale)  # checks guidance

    @property
    def settings(self) -> dict[str, Any]:
        return {**super().settings, "guidance_scale": self.guidance_scale}

    def denoiser(self, network: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """The network as the samplers' denoiser (:func:`~meddiff3d.models.image_diffusion.build_image_denoiser`)."""
        return build_image_denoiser(network, self.meta, guidance_scale=self.guidance_scale,
                                    amp_dtype=autocast_dtype(network))

    def initial_noise(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """One image-shaped standard-normal tensor per seed (:func:`meddiff3d.diffusion.initial_noise`)."""
        return initial_noise(seeds, [1, *self.meta["image"]["shape"]], device)

    def _sample(self, denoiser: Callable[..., torch.Tensor], noise: torch.Tensor,
                class_labels: torch.Tensor | None, generator: int | None, callback: Callable | None) -> torch.Tensor:
        cond = None if class_labels is None else {"class_labels": class_labels.to(noise.device)}
        with torch.no_grad():
            return sample(denoiser, noise, self.schedule, sampler=self.sampler, steps=self.steps,
                          spacing=self.spacing, cond=cond, generator=generator, callback=callback)

    def __call__(self, inputs: torch.Tensor, network: Callable,  # type: ignore[override]
                 class_labels: torch.Tensor | None = None, *, generator: int | None = None,
                 callback: Callable | None = None, **kwargs: Any) -> torch.Tensor:
        """``inputs``: initial noise ``(B, 1, H, W)``; ``class_labels`` ``(B,)`` (a class-conditional model); returns
        images in the model range."""
        return self._sample(self.denoiser(network), inputs, class_labels, generator, callback)

    def posterior(self, inputs: torch.Tensor, network: Callable, operator: Any, y: torch.Tensor, *,
                  noise_std: float = 0.0, prior_variance: float = 0.35, class_labels: torch.Tensor | None = None,
                  generator: int | None = None, callback: Callable | None = None) -> torch.Tensor:
        """Samples of ``x`` given ``y = operator(x) + N(0, noise_std^2)``, ``y`` in the model range
        (:class:`~meddiff3d.diffusion.DataConsistency` around the denoiser); ``inputs``: initial noise."""
        posterior = DataConsistency(self.denoiser(network), operator, y, self.schedule, noise_std=noise_std,
                                    prior_variance=prior_variance)
        return self._sample(posterior, inputs, class_labels, generator, callback)
