"""Healing: turn a volume into its most likely healthy version with a latent diffusion model (or an autoencoder).

Three detection methods, one per :data:`METHODS` entry, all pure functions of ``(models, x, settings)`` with ``x`` a
normalised volume ``(1, 1, *shape)`` on the model grid. For each starting step ``t`` of ``settings.start_steps`` they
return the healed volume; the anomaly map is built from ``|x - healed|`` by :mod:`meddiff3d.anomaly.calibration`.

``latent_inpainting`` (Pinaya et al. 2022; Graham et al. 2023 for several starting steps)
    ``z = encode(x)`` -> noise ``z`` to ``t`` (Gaussian or simplex noise) -> deterministic DDIM back to ``z_rec`` ->
    latent discrepancy ``d = mean_c |z - z_rec|`` -> latent mask ``d > threshold_t`` (a quantile of ``d`` on healthy
    volumes, saved by calibration), dilated -> inpaint the masked latents from ``t`` with RePaint-style resampling
    (:func:`~meddiff3d.diffusion.sample_repaint`, the known latents kept exactly) -> ``healed = decode(z_healed)``.
    Where nothing is masked, ``healed`` is the autoencoder's reconstruction.
``image_resample`` (AutoDDPM-like, Bercea et al. 2023, in latent space)
    ``x_rec = decode(DDIM(noise(z, t)))`` -> image mask ``smooth|x - x_rec| > threshold_t`` (dilated) -> stitch
    ``x_s = M x_rec + (1 - M) x`` -> re-sample: ``encode(x_s)`` noised to ``t`` starts a RePaint run whose known
    latents are those of ``x`` outside the (down-sampled) mask -> ``healed = M decode(z) + (1 - M) x``.
``autoencoder`` (baseline)
    ``healed = decode(encode(x))``; no diffusion model, one "step".

Randomness: the noise of starting step ``k`` is drawn from seed ``settings.seed + 7919 k`` (and the resampling noise
from that plus one), so a case gives the same result whatever else is processed. RePaint's internal re-noising is
Gaussian whatever ``noise`` is; ``noise`` sets the forward noise that decides what gets reconstructed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from meddiff3d.diffusion import gaussian_noise, noise_to, sample_ddim, sample_repaint, schedule_from_dict, simplex_noise
from meddiff3d.checks import check_choice, check_int, check_number
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import build_denoiser, check_guidance_support, load_latent_diffusion, model_conditioning
from meddiff3d.models.loading import load_model

__all__ = ["METHODS", "NOISE_KINDS", "RESIDUAL_NORMALISATIONS", "DetectorSettings", "AnomalyModels",
           "load_anomaly_models", "partial_timesteps",
           "start_noise", "stage_one", "heal", "healing_steps", "brain_mask", "smooth", "dilate"]

METHODS = ("latent_inpainting", "image_resample", "autoencoder")
NOISE_KINDS = ("gaussian", "simplex")
RESIDUAL_NORMALISATIONS = ("per_volume", "calibration")
_STEP_SEED_STRIDE = 7919


@dataclass
class DetectorSettings:
    """Everything that decides the anomaly map; saved in the calibration file and read back at inference.

    Args:
        method: one of :data:`METHODS`.
        start_steps: timesteps the latent is noised to (several: the maps are z-scored per step and averaged).
        steps: DDIM steps over the whole schedule; a start at ``t`` uses ``ceil(steps (t + 1) / T)`` of them.
        resample: RePaint evaluations per step of the inpainting (1 = plain replacement).
        noise: ``"gaussian"`` or ``"simplex"`` (AnoDDPM) forward noise; ``simplex_scale`` (latent voxels) and
            ``simplex_octaves`` shape the simplex noise.
        mask_quantile: stage-one discrepancy quantile on healthy volumes above which a latent (``latent_inpainting``)
            or voxel (``image_resample``) is masked for healing; ``mask_dilation`` dilates the mask (cells).
        smoothing_sigma: Gaussian smoothing of ``|x - healed|`` in voxels (0: none).
        brain_threshold: voxels of the normalised input above it form the brain mask (scores outside are 0).
        residual_normalisation: ``"per_volume"`` (default) divides each residual map by its own brain's 90th
            percentile first (:func:`meddiff3d.anomaly.calibration.residuals`), so a scanner whose residuals are
            larger or smaller overall keeps the calibrated false-positive rate; ``"calibration"`` z-scores the raw
            residuals with the healthy calibration statistics only (the files of format 1).
        top_fraction: the volume score is the mean of this top fraction of the brain's anomaly scores.
        seed: noise seed (see module docstring).
    """

    method: str = "latent_inpainting"
    start_steps: list[int] = field(default_factory=lambda: [200, 350, 500])
    steps: int = 50
    resample: int = 4
    noise: str = "gaussian"
    simplex_scale: float = 8.0
    simplex_octaves: int = 3
    mask_quantile: float = 0.95
    mask_dilation: int = 1
    smoothing_sigma: float = 1.0
    brain_threshold: float = 0.05
    top_fraction: float = 0.01
    seed: int = 0
    residual_normalisation: str = "per_volume"

    def __post_init__(self) -> None:
        check_choice("anomaly detection method", self.method, METHODS, "methods")
        check_choice("noise", self.noise, NOISE_KINDS, "noise kinds")
        check_choice("residual_normalisation", self.residual_normalisation, RESIDUAL_NORMALISATIONS, "choices")
        if isinstance(self.start_steps, (int, float)):
            self.start_steps = [self.start_steps]
        if self.method == "autoencoder":
            self.start_steps = []
        elif not self.start_steps:
            raise InputError("start_steps must be a non-empty list of timesteps >= 1, got []")
        self.start_steps = [check_int("start_steps", t, 1) for t in self.start_steps]
        for name, low in (("steps", 1), ("resample", 1), ("simplex_octaves", 1), ("mask_dilation", 0)):
            setattr(self, name, check_int(name, getattr(self, name), low))
        self.mask_quantile = check_number("mask_quantile", self.mask_quantile, 0.0, 1.0, open_low=True, open_high=True)
        self.top_fraction = check_number("top_fraction", self.top_fraction, 0.0, 1.0, open_low=True)
        self.smoothing_sigma = check_number("smoothing_sigma", self.smoothing_sigma, 0.0)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DetectorSettings:
        values = dict(values or {})
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown detector settings {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def uses_diffusion(self) -> bool:
        return self.method != "autoencoder"

    @property
    def step_names(self) -> list[str]:
        """One name per map that gets its own healthy statistics: ``t200``, ... (``reconstruction`` for the AE)."""
        return [f"t{t}" for t in self.start_steps] or ["reconstruction"]


@dataclass
class AnomalyModels:
    """The codec and (unless the method is the autoencoder baseline) the denoiser with its schedule and condition."""

    codec: torch.nn.Module
    codec_meta: dict
    denoiser: Callable[..., torch.Tensor] | None = None
    schedule: Any = None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict | None = None
    device: torch.device = torch.device("cpu")

    @property
    def image_shape(self) -> list[int]:
        image = (self.meta or {}).get("image") or self.codec_meta.get("image") or {}
        if "shape" not in image:
            raise InputError("the codec meta records no image shape; it cannot be used for anomaly detection")
        return [int(s) for s in image["shape"]]

    @property
    def image_spacing(self) -> list[float]:
        image = (self.meta or {}).get("image") or self.codec_meta.get("image") or {}
        return [float(s) for s in image.get("spacing", [1.0, 1.0, 1.0])]


def load_anomaly_models(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike | None, *,
                        device: str | torch.device = "auto", amp: str = "auto",
                        decode_split: int | None = None) -> AnomalyModels:
    """The models a detector needs; ``diffusion_path=None`` loads the codec only (autoencoder baseline).

    A conditional diffusion model is run with its null condition, so it must have been trained with conditioning
    dropout (refused otherwise, as generation does).
    """
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    if diffusion_path is None:
        options = {"split": decode_split} if decode_split else {}
        codec = load_model(codec_path, "codec", device=dev, amp_dtype=dtype, **options)
        return AnomalyModels(codec.network, codec.meta, device=dev)
    codec, diffusion = load_latent_diffusion(codec_path, diffusion_path, device=dev, dtype=dtype,
                                             decode_split=decode_split)
    network, meta = diffusion.network, diffusion.meta
    check_guidance_support(meta, diffusion_path, conditional=False, guidance_scale=1.0)
    denoiser = build_denoiser(network, meta, conditional=False, amp_dtype=dtype)
    cond = model_conditioning(meta, None, 1, dev)
    return AnomalyModels(codec.network, codec.meta, denoiser, schedule_from_dict(meta["schedule"]), cond, meta, dev)


# ------------------------------------------------------------------------------------------------ small operations
def partial_timesteps(schedule: Any, start: int, steps: int) -> torch.Tensor:
    """Descending integer timesteps from ``start`` to 0: ``ceil(steps (start + 1) / T)`` of them (at least one)."""
    T = int(schedule.num_train_timesteps)
    if not 1 <= int(start) < T:
        raise InputError(f"start step {start} is outside [1, {T - 1}] for a {T}-step schedule")
    n = max(1, math.ceil(int(steps) * (int(start) + 1) / T))
    ts = torch.linspace(float(start), 0.0, n + 1)[:-1] if n > 1 else torch.tensor([float(start)])
    return ts.round()


def start_noise(shape: Sequence[int], settings: DetectorSettings, seed: int, device: torch.device) -> torch.Tensor:
    """Forward noise of ``shape``: standard Gaussian, or simplex noise normalised to zero mean and unit variance."""
    if settings.noise == "simplex":
        return simplex_noise(shape, octaves=settings.simplex_octaves, scale=settings.simplex_scale,
                             persistence=0.8, generator=seed, device=device)
    return gaussian_noise(shape, generator=seed, device=device)


def smooth(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(B, C, *spatial)`` (``sigma`` in voxels; 0 returns the input)."""
    if sigma <= 0:
        return volume
    radius = max(1, int(math.ceil(3 * sigma)))
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32, device=volume.device)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = volume.float()
    channels = out.shape[1]
    spatial = out.ndim - 2
    conv = {2: F.conv2d, 3: F.conv3d}[spatial]
    for axis in range(spatial):
        shape = [1] * spatial
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * spatial))
        padding = [0] * spatial
        padding[axis] = radius
        out = conv(out, weight, padding=padding, groups=channels)
    return out


def dilate(mask: torch.Tensor, cells: int) -> torch.Tensor:
    """Binary dilation of a ``(B, 1, *spatial)`` mask by a cube of half-width ``cells``."""
    if cells <= 0:
        return mask
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return pool(mask.float(), 2 * cells + 1, stride=1, padding=cells)


def brain_mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Voxels of the normalised input above ``threshold`` (float 0/1, same shape)."""
    return (x > threshold).float()


def _latent_cells(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """An image-grid mask down-sampled to the latent grid: a cell is set if any of its voxels is."""
    pool = F.max_pool3d if mask.ndim == 5 else F.max_pool2d
    return pool(mask.float(), factor, stride=factor) if factor > 1 else mask.float()


def _step_seed(settings: DetectorSettings, k: int) -> int:
    return int(settings.seed) + _STEP_SEED_STRIDE * k


def _denoise_from(models: AnomalyModels, z: torch.Tensor, start: int, noise: torch.Tensor,
                  settings: DetectorSettings, callback: Callable | None = None) -> torch.Tensor:
    ts = partial_timesteps(models.schedule, start, settings.steps)
    z_t = noise_to(z, start, models.schedule, noise)
    return sample_ddim(models.denoiser, z_t, ts, models.schedule, cond=models.cond, callback=callback)


def healing_steps(models: AnomalyModels, settings: DetectorSettings, stage: str = "heal") -> int:
    """Denoiser steps one volume takes (the calls of ``callback`` in :func:`heal`, or in :func:`stage_one` with
    ``stage="stage_one"``): per starting step, one DDIM run back from it for the discrepancy, then the RePaint run
    (``latent_inpainting``) or a second DDIM run and the RePaint run (``image_resample``). 0 for the autoencoder."""
    if not settings.uses_diffusion:
        return 0
    one_pass = sum(len(partial_timesteps(models.schedule, t, settings.steps)) for t in settings.start_steps)
    if stage == "stage_one":
        return one_pass
    return one_pass * (2 if settings.method == "latent_inpainting" else 3)


# ------------------------------------------------------------------------------------------------ the methods
@torch.no_grad()
def stage_one(models: AnomalyModels, x: torch.Tensor, settings: DetectorSettings,
              z: torch.Tensor | None = None, callback: Callable | None = None) -> list[torch.Tensor]:
    """The discrepancy that decides what gets healed, per starting step: ``mean_c |z - z_rec|`` on the latent grid
    (``latent_inpainting``) or ``smooth|x - decode(z_rec)|`` on the image grid (``image_resample``), 0 outside the
    brain. Empty for the autoencoder baseline. ``callback(i, t, z, z0)``: after each denoiser step (progress)."""
    if not settings.uses_diffusion:
        return []
    z = models.codec.encode(x) if z is None else z
    brain = brain_mask(x, settings.brain_threshold)
    out = []
    for k, start in enumerate(settings.start_steps):
        noise = start_noise(z.shape, settings, _step_seed(settings, k), z.device)
        z_rec = _denoise_from(models, z, start, noise, settings, callback)
        if settings.method == "latent_inpainting":
            factor = x.shape[-1] // z.shape[-1]
            out.append((z - z_rec).abs().mean(1, keepdim=True) * _latent_cells(brain, factor))
        else:
            x_rec = models.codec.decode(z_rec)
            out.append(smooth((x - x_rec).abs(), settings.smoothing_sigma) * brain)
    return out


@torch.no_grad()
def heal(models: AnomalyModels, x: torch.Tensor, settings: DetectorSettings,
         mask_thresholds: Sequence[float] | None = None,
         callback: Callable | None = None) -> dict[str, list[torch.Tensor]]:
    """``{"healed": [volume per starting step], "masks": [heal mask per step, on its grid]}`` for ``x`` (1, 1, ...).

    ``mask_thresholds`` (one per starting step, from the calibration) are required by the diffusion methods.
    ``callback(i, t, z, z0)`` runs after every denoiser step (:func:`healing_steps` of them), e.g. a progress bar.
    """
    if not settings.uses_diffusion:
        return {"healed": [models.codec.decode(models.codec.encode(x))], "masks": []}
    if mask_thresholds is None or len(mask_thresholds) != len(settings.start_steps):
        raise InputError(f"{settings.method} needs one mask threshold per starting step {settings.start_steps}, "
                         f"got {mask_thresholds}")
    z = models.codec.encode(x)
    factor = x.shape[-1] // z.shape[-1]
    discrepancies = stage_one(models, x, settings, z, callback)
    healed, masks = [], []
    for k, (start, d, threshold) in enumerate(zip(settings.start_steps, discrepancies, mask_thresholds)):
        mask = dilate((d > float(threshold)).float(), settings.mask_dilation)
        ts = partial_timesteps(models.schedule, start, settings.steps)
        noise = start_noise(z.shape, settings, _step_seed(settings, k), z.device)
        generator = _step_seed(settings, k) + 1
        if settings.method == "latent_inpainting":
            z_init = noise_to(z, start, models.schedule, noise)
            z_healed = sample_repaint(models.denoiser, z_init, ts, models.schedule, known=z, mask=1 - mask,
                                      resample=settings.resample, generator=generator, cond=models.cond,
                                      callback=callback)
            healed.append(models.codec.decode(z_healed))
        else:
            x_rec = models.codec.decode(_denoise_from(models, z, start, noise, settings, callback))
            stitched = mask * x_rec + (1 - mask) * x
            latent_mask = _latent_cells(mask, factor)
            z_init = noise_to(models.codec.encode(stitched), start, models.schedule, noise)
            z_healed = sample_repaint(models.denoiser, z_init, ts, models.schedule, known=z, mask=1 - latent_mask,
                                      resample=settings.resample, generator=generator, cond=models.cond,
                                      callback=callback)
            healed.append(mask * models.codec.decode(z_healed) + (1 - mask) * x)
        masks.append(mask)
    return {"healed": healed, "masks": masks}
