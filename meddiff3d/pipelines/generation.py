"""Generation: a trained latent diffusion model + its codec -> NIfTI volumes with previews and sidecars.

The data flow is a chain of plain calls, each a wrapper or a pure function from :mod:`meddiff3d.diffusion`::

    network (EMA weights) -> Autocast (bf16 on capable CPUs / GPUs) -> [AppendCoordinates]
      -> ConcatConditioning("concat")
      -> make_denoiser(schedule, prediction) -> ClassifierFreeGuidance(scale, null condition)   [conditional only]
      -> SAMPLERS[sampler](denoiser, noise, schedule.timesteps(steps, spacing), schedule, cond=...)
      -> codec.decode (tiled if asked) -> NIfTI (the model's RAS affine) + PNG preview + JSON sidecar

Everything the chain needs comes from the two files: the diffusion model's meta (architecture, schedule, prediction,
covariate names and null value, conditioning mode, image geometry, the codec fingerprint it was trained with) and the
codec file (autoencoder, latent scale and shift). Nothing is recomputed.

Reproducibility: sample ``i`` starts from noise drawn with seed ``seed + i`` and is written as
``sample_seed{seed + i}.nii.gz``, so one sample of a batch can be regenerated alone (``seed=seed + i,
num_samples=1``); with ``batch_size=1`` (the default) this holds for the stochastic ``ddpm`` sampler too.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.diffusion import (
    SAMPLERS,
    ClassifierFreeGuidance,
    ConcatConditioning,
    NoiseSchedule,
    get_sampler,
    make_denoiser,
    schedule_from_dict,
)
from meddiff3d.engine.checkpoint import build_network, load_weights, read_file
from meddiff3d.engine.precision import resolve_device, store_for_autocast
from meddiff3d.errors import InputError
from meddiff3d.models.codec import LatentCodec, load_codec
from meddiff3d.models.ldm import (
    codec_file_fingerprint,
    coordinate_wrapper,
    covariate_conditioning,
    covariate_vector,
    file_sha256,
    null_condition,
)
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["generate", "load_models", "build_denoiser", "sample_latents", "sampling_timesteps", "inference_dtype",
           "Autocast", "prepare_for_inference", "check_guidance_support", "TIMESTEP_SPACING", "MONAI_SPACING",
           "AMP_CHOICES"]

#: timestep spacing per sampler (others: ``"linspace"``, MONAI's DDIM); DPM-Solver++ wants uniform log-SNR steps
TIMESTEP_SPACING = {"dpmpp_2m": "log_snr"}
#: spacing name for MONAI ``DDIMScheduler`` stepping: ``"linspace"`` timesteps, each step landing on ``t - T // n``
#: (not on the next timestep), so a DDIM run reproduces a model-zoo ``scheduler.step`` loop exactly
MONAI_SPACING = "monai"
AMP_CHOICES = ("auto", "bf16", "fp16", "none")


# ------------------------------------------------------------------------------------------------ precision
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): only then is bf16 autocast faster."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - private API; fall back to the kernel's CPU flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags


def inference_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``amp``: ``"auto"`` = bf16 on CPUs with native bf16 and on bf16 GPUs, fp16 on other GPUs,
    else none (float32)."""
    if amp not in AMP_CHOICES:
        raise InputError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if amp == "none":
        return None
    if amp == "fp16":
        if device.type != "cuda":
            raise InputError("amp 'fp16' needs a CUDA device; use 'bf16' or 'none' on the CPU")
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def is_channels_last_3d(net: Any) -> bool:
    """Whether ``net``'s first 5-D weight is stored channels-last (``torch.channels_last_3d``)."""
    params = net.parameters() if isinstance(net, torch.nn.Module) else ()
    weight = next((p for p in params if p.ndim == 5), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last_3d)


class Autocast:
    """Network wrapper: run ``net`` under autocast to ``dtype`` and return float32 (the sampler's maths stays fp32).
    A 5-D input goes in channels-last when ``net``'s weights are (:func:`prepare_for_inference`), so the first
    convolution does not convert it."""

    def __init__(self, net: Callable[..., torch.Tensor], dtype: torch.dtype | None) -> None:
        self.net, self.dtype = net, dtype
        self.channels_last = is_channels_last_3d(net)

    def __call__(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.dtype is None:
            return self.net(x, **kwargs)
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device_type=x.device.type, dtype=self.dtype):
            return self.net(x, **kwargs).float().contiguous()


def prepare_for_inference(network: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Ready a loaded network for :class:`Autocast` to ``dtype``: convolution and linear weights stored in ``dtype``
    (:func:`meddiff3d.engine.precision.store_for_autocast`: same result, half the weight memory, no cast per step)
    and, for 3D networks, channels-last (oneDNN's and cuDNN's preferred layout for low-precision 3D convolutions).
    Float32 (``dtype=None``) leaves the network as it is, so it matches a plain MONAI loop to float rounding.

    Measured on the anchor U-Net (553 M parameters, one 7x20x28x20 step, one thread of a CPU with AVX512-BF16):
    float32 14.3 s, bf16 autocast 7.0 s and 3.8 GB peak RSS, + weights stored in bf16 6.65 s and 2.6 GB, + channels-last
    6.5 s.
    """
    if dtype is None:
        return network
    store_for_autocast(network, dtype)
    if any(p.ndim == 5 for p in network.parameters()):
        network.to(memory_format=torch.channels_last_3d)
    return network


# ------------------------------------------------------------------------------------------------ models
def load_models(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike, *, check_pair: bool = True,
                device: torch.device | str = "cpu", decode_tile: Sequence[int] | None = None,
                decode_split: int | None = None,
                amp_dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, dict, LatentCodec, dict]:
    """``(network, meta, codec, codec_meta)`` on ``device``, after checking the pair belongs together; with
    ``amp_dtype`` the network is ready for :class:`Autocast` to it (:func:`prepare_for_inference`), so run it only
    through :func:`build_denoiser` with the same ``amp_dtype``.

    ``check_pair=False`` skips the codec fingerprint check (e.g. to try a re-calibrated codec); the latent channel
    count and shape must fit in any case.
    """
    codec_path, diffusion_path = Path(codec_path), Path(diffusion_path)
    for what, path in (("codec", codec_path), ("diffusion model", diffusion_path)):
        if not path.is_file():
            raise InputError(f"{what} file {path} does not exist")
    data = read_file(diffusion_path)
    meta = data.get("meta") or {}
    if meta.get("kind") != "latent_diffusion":
        raise InputError(f"{diffusion_path} is not a latent diffusion model (meta kind {meta.get('kind')!r})")
    expected = (meta.get("codec") or {}).get("fingerprint")
    if check_pair and expected != codec_file_fingerprint(codec_path):
        raise InputError(
            f"codec file {codec_path} is not the codec the diffusion model {diffusion_path} was trained with "
            f"(it expects {meta['codec'].get('file')!r}, fingerprint {str(expected)[:12]}...); pass the matching codec"
        )
    options = {"split": decode_split} if decode_split else {}
    # low precision decodes channels-last (anchor autoencoder, 3x10x14x10 latent, bf16, one thread: 11.4 s -> 9.7 s)
    codec, codec_meta = load_codec(codec_path, map_location="cpu", decode_tile=decode_tile, amp_dtype=amp_dtype,
                                   channels_last=amp_dtype is not None, **options)
    try:
        latent = list(codec.latent_shape(meta["image"]["shape"]))
    except ValueError as err:
        raise InputError(f"codec {codec_path}: {err}") from err
    if latent != list(meta["latent"]["shape"]):
        raise InputError(f"codec {codec_path} makes latents {latent}, the diffusion model expects "
                         f"{meta['latent']['shape']}")
    network = build_network(meta, device="meta")  # the weights are the file's tensors: held once, not twice
    load_weights(data, network, "ema", source=f"diffusion model {diffusion_path}", assign=True)
    del data
    network = prepare_for_inference(network.to(device).eval(), amp_dtype)
    return network, meta, codec.to(device), codec_meta


def build_denoiser(network: Callable[..., torch.Tensor], meta: Mapping[str, Any], *, guidance_scale: float = 1.0,
                   conditional: bool = True, amp_dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """The denoiser ``(x, t, **cond) -> x0`` the samplers call, by wrapping (never branching inside the sampler)."""
    mode = meta["conditioning"]["mode"]
    net: Callable[..., torch.Tensor] = Autocast(network, amp_dtype)
    with_coordinates = coordinate_wrapper(meta)
    if with_coordinates is not None:
        net = with_coordinates(net)
    if mode in ("both", "concat"):
        net = ConcatConditioning(net, "concat")
    denoiser = make_denoiser(net, schedule_from_dict(meta["schedule"]), meta["prediction"])
    if conditional and mode != "none" and guidance_scale != 1.0:
        cond_meta = meta["conditioning"]
        null = null_condition(len(cond_meta["covariates"]), mode, cond_meta["null_value"])
        denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, null)
    return denoiser


def model_conditioning(meta: Mapping[str, Any], covariates: torch.Tensor | None, batch: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
    """Conditioning keywords for ``batch`` samples: covariates ``(n,)``, or the null condition for ``None``."""
    cond_meta = meta["conditioning"]
    n = len(cond_meta["covariates"])
    cov = torch.full((n,), float(cond_meta["null_value"])) if covariates is None else covariates
    return {k: v.to(device) for k, v in covariate_conditioning(cov.expand(batch, n), cond_meta["mode"]).items()}


def sampling_timesteps(schedule: Any, steps: int, spacing: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(timesteps, prev_timesteps)`` for a sampler: ``prev_timesteps`` is ``None`` (each step lands on the next
    timestep) except for :data:`MONAI_SPACING`, where each step lands on ``t - T // steps`` as in MONAI's
    ``DDIMScheduler.step``."""
    if spacing == MONAI_SPACING:
        if not isinstance(schedule, NoiseSchedule):
            raise InputError(f"spacing {MONAI_SPACING!r} is MONAI's DDIMScheduler stepping, for DDPM-type schedules "
                             f"only (this model has a {type(schedule).__name__})")
        timesteps = schedule.timesteps(steps, "linspace")
        return timesteps, timesteps - schedule.num_train_timesteps // int(steps)
    return schedule.timesteps(steps, spacing=spacing), None


def sample_latents(denoiser: Callable[..., torch.Tensor], noise: torch.Tensor, meta: Mapping[str, Any], *,
                   sampler: str = "ddim", steps: int = 50, spacing: str | None = None,
                   cond: Mapping[str, torch.Tensor] | None = None, generator: int | None = None,
                   callback: Callable | None = None) -> torch.Tensor:
    """Run a pure sampler from ``noise`` ``(B, *latent_shape)`` to normalised latents."""
    schedule = schedule_from_dict(meta["schedule"])
    timesteps, prev = sampling_timesteps(schedule, steps, spacing or TIMESTEP_SPACING.get(sampler, "linspace"))
    return get_sampler(sampler)(denoiser, noise, timesteps, schedule, generator=generator, callback=callback,
                                cond=cond, prev_timesteps=prev)


def initial_noise(seeds: Sequence[int], latent_shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """One standard-normal latent per seed (drawn on the CPU so a seed gives the same sample on every device)."""
    draws = [torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(draws).to(device)


# ------------------------------------------------------------------------------------------------ validation
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _parse_covariates(covariates: Any) -> Mapping[str, Any] | None:
    if isinstance(covariates, str):
        text = covariates.strip()
        if text.lower() in ("", "none", "null"):
            return None
        try:
            covariates = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise InputError(f"covariates {text!r} is not a mapping like {{'age': 0.5, ...}}") from None
    if isinstance(covariates, Mapping) and not covariates:
        return None  # no covariates given: unconditional
    if covariates is not None and not isinstance(covariates, Mapping):
        raise InputError(f"covariates must be a mapping name -> value in [0, 1] or None (unconditional), "
                         f"got {covariates!r}")
    return covariates


def check_request(*, sampler: str, steps: Any, num_samples: Any, guidance_scale: Any, seed: Any, amp: str,
                  batch_size: Any, decode_tile: Any) -> dict[str, Any]:
    """Validate the generation settings that need no model; returns them normalised."""
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    out = {"steps": _check_int("steps", steps, 1), "num_samples": _check_int("num_samples", num_samples, 1),
           "seed": _check_int("seed", seed, 0), "batch_size": _check_int("batch_size", batch_size, 1)}
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise InputError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}") from None
    if not (math.isfinite(scale) and scale >= 0):
        raise InputError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    out["guidance_scale"] = scale
    if amp not in AMP_CHOICES:
        raise InputError(f"unknown amp {amp!r}; valid: {', '.join(AMP_CHOICES)}")
    if decode_tile is not None:
        if isinstance(decode_tile, (int, np.integer)):
            decode_tile = [int(decode_tile)] * 3
        if len(decode_tile) != 3 or any(_check_int("decode_tile", t, 1) < 1 for t in decode_tile):
            raise InputError(f"decode_tile must be three latent sizes (or one), got {decode_tile!r}")
        decode_tile = [int(t) for t in decode_tile]
    out["decode_tile"] = decode_tile
    return out


def check_guidance_support(meta: Mapping[str, Any], source: Any, *, conditional: bool, guidance_scale: float) -> None:
    """Refuse unconditional sampling and guidance for a conditional model trained without conditioning dropout
    (``meta["training"]["cond_dropout"] == 0``, e.g. the converted model-zoo anchor): it never saw the null
    condition, so both would feed it an input it cannot interpret."""
    if meta["conditioning"]["mode"] == "none" or (meta.get("training") or {}).get("cond_dropout", None) != 0:
        return
    if not conditional:
        raise InputError(f"diffusion model {source} was trained without conditioning dropout and cannot sample "
                         "unconditionally; give every covariate (" + ", ".join(meta["conditioning"]["covariates"])
                         + ")")
    if guidance_scale != 1.0:
        raise InputError(f"diffusion model {source} was trained without conditioning dropout, so classifier-free "
                         f"guidance is undefined for it; use guidance_scale 1 (got {guidance_scale:g})")


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
        spacing: timestep spacing override (default per sampler, :data:`TIMESTEP_SPACING`); ``"monai"``
            (:data:`MONAI_SPACING`) steps as MONAI's ``DDIMScheduler`` does, for exact parity with a MONAI loop.
        check_pair: refuse a codec other than the one the model was trained with (fingerprint).

    Every setting is validated, and both files are read, before anything is written; an :class:`InputError` names
    the bad value.
    """
    start = time.perf_counter()
    request = check_request(sampler=sampler, steps=steps, num_samples=num_samples, guidance_scale=guidance_scale,
                            seed=seed, amp=amp, batch_size=batch_size, decode_tile=decode_tile)
    covariates = _parse_covariates(covariates)
    dev = resolve_device(device)
    dtype = inference_dtype(amp, dev)
    if decode_split is not None:
        decode_split = _check_int("decode_split", decode_split, 1)
    network, meta, codec, _ = load_models(codec_path, diffusion_path, check_pair=check_pair, device=dev,
                                          decode_tile=request["decode_tile"], decode_split=decode_split,
                                          amp_dtype=dtype)
    cond_meta = meta["conditioning"]
    names = list(cond_meta["covariates"])
    if covariates is not None and cond_meta["mode"] == "none":
        raise InputError(f"diffusion model {diffusion_path} is unconditional; set covariates to None")
    cov = None if covariates is None else covariate_vector(covariates, names)
    schedule = schedule_from_dict(meta["schedule"])
    sampling_timesteps(schedule, request["steps"], spacing or TIMESTEP_SPACING.get(sampler, "linspace"))  # validates
    conditional = cov is not None
    check_guidance_support(meta, diffusion_path, conditional=conditional, guidance_scale=request["guidance_scale"])
    given = None if cov is None else {n: float(covariates[n]) for n in names}
    denoiser = build_denoiser(network, meta, guidance_scale=request["guidance_scale"], conditional=conditional,
                              amp_dtype=dtype)

    out_dir, image_meta = Path(output_dir), meta["image"]
    hashes = {"diffusion": {"file": str(diffusion_path), "sha256": file_sha256(diffusion_path)},
              "codec": {"file": str(codec_path), "sha256": file_sha256(codec_path),
                        "fingerprint": meta["codec"]["fingerprint"], "pair_checked": bool(check_pair)}}
    settings = {
        "covariates": given,
        "covariates_raw": None if given is None else raw_covariates(given, cond_meta.get("scaling") or {}),
        "conditional": conditional, "sampler": sampler, "steps": request["steps"],
        "denoiser_evaluations": request["steps"] * (2 if sampler == "heun" else 1),
        "timestep_spacing": spacing or TIMESTEP_SPACING.get(sampler, "linspace"),
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
            z = sample_latents(denoiser, noise, meta, sampler=sampler, steps=request["steps"], spacing=spacing,
                               cond=cond, generator=batch_seeds[0], callback=callback)
            latents.append((batch_seeds, z, time.perf_counter() - t0))
    finally:
        if bar is not None:
            bar.close()
    del denoiser, network
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


def preview_sampler(codec_path: str | os.PathLike, meta: Mapping[str, Any], steps: int = 10,
                    covariate_value: float = 0.5) -> Callable[[torch.nn.Module], torch.Tensor]:
    """A training preview: ``fn(ema_network) -> decoded volume`` (DDIM, fixed noise, every covariate at 0.5)."""
    codec, _ = load_codec(codec_path)

    def preview(network: torch.nn.Module) -> torch.Tensor:
        device = next(network.parameters()).device
        n = len(meta["conditioning"]["covariates"])
        cov = torch.full((n,), covariate_value) if meta["conditioning"]["mode"] != "none" else None
        denoiser = build_denoiser(network, meta, conditional=cov is not None)
        z = sample_latents(denoiser, initial_noise([0], meta["latent"]["shape"], device), meta, steps=steps,
                           cond=model_conditioning(meta, cov, 1, device))
        return codec.to(device).decode(z)[0, 0]

    return preview
