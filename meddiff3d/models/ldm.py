"""The covariate-conditioned latent diffusion model: its U-Net, how covariates reach it, and what its file holds.

A latent diffusion model (LDM) denoises the normalised latents ``z`` of a :class:`~meddiff3d.models.codec.LatentCodec`.
Covariates (by default the four of the MONAI model-zoo brain LDM, :data:`BRAIN_COVARIATES`: sex, age, ventricular
volume, brain volume, each scaled to [0, 1]) reach the U-Net in one of four ways (``conditioning``):

=========  =====================================================================================================
both       concatenated as constant channels (``in_channels = latent + n``) AND as cross-attention context
           ``(B, 1, n)`` (the model-zoo anchor)
concat     channels only
crossattn  cross-attention only (``with_conditioning``, ``cross_attention_dim = n``)
none       unconditional
=========  =====================================================================================================

**Coordinate channels** (``coordinates=True``, off for the anchor): three channels ``linspace(-1, 1)`` per latent axis
are appended after the covariate channels (:class:`~meddiff3d.diffusion.AppendCoordinates`, the PatchDDM encoding).
All training volumes share one grid, so the absolute position tells a small convolutional U-Net where anatomy belongs;
without it a CPU-sized network cannot place the brain at high noise levels (its x0 estimate at t = 800 was worse than
the mean training latent). Saved as ``conditioning.coordinates`` and applied by the same wrapper in training and
sampling (:func:`coordinate_wrapper`).

**The null condition.** Classifier-free guidance needs an "unconditional" input the network can tell apart from any real
covariate vector. Zero is a real value here (sex 0 = female, age 0 = 40 years), so the null condition is
:data:`NULL_COVARIATE` (-1) in every entry, outside the [0, 1] range of real covariates. The value is saved in the
model's meta (``conditioning.null_value``) and read back at inference, never assumed.

File of a trained model (``models/diffusion.pt``, the engine's inference export, read with ``weights_only=True``)::

    {"format": "meddiff3d.inference/1", "iteration": int, "ema": state_dict,
     "meta": {"kind": "latent_diffusion",
              "network": {"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}},
              "schedule": NoiseSchedule.to_dict(), "prediction": "epsilon",
              "conditioning": {"mode", "covariates": [names, in order], "null_value": -1.0, "range": [0, 1],
                               "scaling": {name: {"min", "max", "unit", ...}}},   # datalist's scaling, to map back
              "latent": {"shape": [C, d, h, w]},                    # normalised latents (codec scale applied)
              "image": {"shape", "spacing", "affine" (4x4 RAS mm), "orientation": "RAS", "normalisation"},
              "codec": {"file": name, "fingerprint": sha256 of the codec's content, "latent_scale", "latent_shift"},
              "training": {...}}}
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from meddiff3d.errors import InputError

__all__ = [
    "BRAIN_COVARIATES",
    "NULL_COVARIATE",
    "CONDITIONING_MODES",
    "UNET_PRESETS",
    "ANCHOR_SCHEDULE",
    "latent_unet_spec",
    "covariate_conditioning",
    "null_condition",
    "covariate_vector",
    "codec_fingerprint",
    "codec_file_fingerprint",
    "file_sha256",
    "latent_diffusion_meta",
    "coordinate_wrapper",
]

#: covariate names (and order) of the MONAI model-zoo brain LDM ("gender" there), all scaled to [0, 1]
BRAIN_COVARIATES = ("sex", "age", "ventricular_volume", "brain_volume")
#: the value of every covariate in the null (unconditional) condition: outside the real range [0, 1]
NULL_COVARIATE = -1.0
COVARIATE_RANGE = (0.0, 1.0)
CONDITIONING_MODES = ("both", "concat", "crossattn", "none")

#: U-Net architectures (without the channel / conditioning arguments, which are derived).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # The model-zoo brain_image_synthesis_latent_diffusion_model U-Net (~1.1e8 parameters at 3+4 input channels).
    "anchor": {
        "channels": [256, 512, 768], "attention_levels": [False, True, True], "num_head_channels": [0, 512, 768],
        "num_res_blocks": 2, "resblock_updown": True, "transformer_num_layers": 1, "upcast_attention": True,
        "norm_num_groups": 32,
    },
    # ~3.2 M parameters: trains at about a second per step (batch 4, 3x20x28x20 latents) on two CPU cores and
    # denoises a full-size latent in ~0.05 s (bf16). Attention only at the coarsest level.
    "tiny_cpu": {
        "channels": [32, 64, 64], "attention_levels": [False, False, True], "num_head_channels": [0, 0, 32],
        "num_res_blocks": 1, "resblock_updown": False, "transformer_num_layers": 1, "upcast_attention": True,
        "norm_num_groups": 16,
    },
    # For tests: a few tens of thousands of parameters.
    "test": {
        "channels": [8, 16, 16], "attention_levels": [False, False, True], "num_head_channels": [0, 0, 8],
        "num_res_blocks": 1, "resblock_updown": False, "transformer_num_layers": 1, "upcast_attention": True,
        "norm_num_groups": 8,
    },
}  # fmt: skip

#: the anchor's noise schedule (scaled-linear betas 0.0015-0.0205, T = 1000), as NoiseSchedule arguments
ANCHOR_SCHEDULE = {"schedule": "scaled_linear_beta", "num_train_timesteps": 1000, "beta_start": 0.0015,
                   "beta_end": 0.0205}


def _check_mode(mode: str) -> None:
    if mode not in CONDITIONING_MODES:
        raise InputError(f"unknown conditioning mode {mode!r}; valid: {', '.join(CONDITIONING_MODES)}")


def latent_unet_spec(latent_channels: int, covariates: Sequence[str] = BRAIN_COVARIATES, conditioning: str = "both",
                     preset: str = "tiny_cpu", *, coordinates: bool = False, **overrides: Any) -> dict[str, Any]:
    """``{"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}}`` for a latent U-Net.

    ``in_channels`` = ``latent_channels`` (+ number of covariates with concat conditioning, + 3 with
    ``coordinates``); ``with_conditioning`` and
    ``cross_attention_dim`` = number of covariates with cross-attention; ``preset`` names an architecture of
    :data:`UNET_PRESETS` (``"anchor"``, ``"tiny_cpu"``, ``"test"``) and ``overrides`` replace any of its arguments.
    """
    _check_mode(conditioning)
    if preset not in UNET_PRESETS:
        raise InputError(f"unknown U-Net preset {preset!r}; valid: {', '.join(UNET_PRESETS)}")
    n_cov = len(covariates) if conditioning != "none" else 0
    if conditioning != "none" and n_cov == 0:
        raise InputError(f"conditioning {conditioning!r} needs at least one covariate name")
    concat = conditioning in ("both", "concat")
    crossattn = conditioning in ("both", "crossattn")
    args: dict[str, Any] = {
        "spatial_dims": 3,
        "in_channels": int(latent_channels) + (n_cov if concat else 0) + (3 if coordinates else 0),
        "out_channels": int(latent_channels),
        **UNET_PRESETS[preset],
        "with_conditioning": crossattn,
        "cross_attention_dim": n_cov if crossattn else None,
    }
    if not crossattn:  # MONAI rejects cross-attention settings without conditioning; keep the spec minimal
        args.pop("cross_attention_dim")
    args.update(overrides)
    return {"class": "monai.networks.nets.DiffusionModelUNet", "args": args}


def covariate_conditioning(cov: torch.Tensor, mode: str) -> dict[str, torch.Tensor]:
    """Covariates ``(B, n)`` as the keywords the wrapped network takes: ``concat`` ``(B, n)`` (broadcast over space by
    :class:`~meddiff3d.diffusion.ConcatConditioning`) and/or ``context`` ``(B, 1, n)``; ``{}`` for ``"none"``."""
    _check_mode(mode)
    if mode == "none":
        return {}
    cov = torch.as_tensor(cov, dtype=torch.float32)
    if cov.ndim != 2:
        raise InputError(f"covariates must have shape (batch, n), got {tuple(cov.shape)}")
    out = {}
    if mode in ("both", "concat"):
        out["concat"] = cov
    if mode in ("both", "crossattn"):
        out["context"] = cov[:, None, :]
    return out


def null_condition(num_covariates: int, mode: str, value: float = NULL_COVARIATE) -> dict[str, torch.Tensor]:
    """The null condition per key (shapes broadcastable to a batch), for ``DiffusionObjective(null_cond=...)`` and
    ``ClassifierFreeGuidance(null_cond=...)``: every covariate set to ``value``."""
    return covariate_conditioning(torch.full((1, int(num_covariates)), float(value)), mode) if mode != "none" else {}


def covariate_vector(values: Mapping[str, Any], names: Sequence[str], what: str = "covariates") -> torch.Tensor:
    """``{"age": 0.5, ...}`` -> float32 ``(n,)`` in the order of ``names``; every name required, each in [0, 1]."""
    if not isinstance(values, Mapping):
        raise InputError(f"{what} must be a mapping name -> value in [0, 1] (names: {', '.join(names)}), "
                         f"got {values!r}")
    unknown = [k for k in values if k not in names]
    if unknown:
        raise InputError(f"{what}: unknown covariate(s) {unknown}; this model knows {', '.join(names)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise InputError(f"{what}: covariate(s) {missing} missing; give all of {', '.join(names)} "
                         "(or none at all for unconditional sampling)")
    out = []
    lo, hi = COVARIATE_RANGE
    for name in names:
        value = values[name]
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{what}: {name}={value!r} is not a number") from None
        if not lo <= number <= hi:  # also rejects NaN
            raise InputError(f"{what}: {name}={value!r} is outside [{lo:g}, {hi:g}] (covariates are scaled to [0, 1])")
        out.append(number)
    return torch.tensor(out, dtype=torch.float32)


def codec_fingerprint(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """SHA-256 of a codec's content (tensor names and bytes, latent scale/shift included, plus its meta as JSON):
    stable across re-saves, changed by any change of weights, normalisation or description."""
    h = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def codec_file_fingerprint(path: str | os.PathLike) -> str:
    """:func:`codec_fingerprint` of the codec file at ``path`` (read weights-only)."""
    data = torch.load(Path(path), map_location="cpu", weights_only=True)
    return codec_fingerprint(data["weights"], data["meta"])


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def latent_diffusion_meta(*, network: Mapping[str, Any], schedule: Mapping[str, Any], prediction: str,
                          covariates: Sequence[str], conditioning: str, latent_shape: Sequence[int],
                          image: Mapping[str, Any], codec_path: str | os.PathLike,
                          scaling: Mapping[str, Any] | None = None,
                          training: Mapping[str, Any] | None = None, coordinates: bool = False) -> dict[str, Any]:
    """The meta saved with a latent diffusion model (layout in the module docstring); the codec entry (fingerprint,
    latent scale and shift) is read from ``codec_path``."""
    _check_mode(conditioning)
    for key in ("shape", "spacing", "affine"):
        if key not in image:
            raise InputError(f"latent diffusion meta: image geometry needs {key!r} (got {sorted(image)})")
    codec = torch.load(Path(codec_path), map_location="cpu", weights_only=True)
    return {
        "kind": "latent_diffusion",
        "network": dict(network),
        "schedule": dict(schedule),
        "prediction": prediction,
        "conditioning": {"mode": conditioning, "covariates": list(covariates) if conditioning != "none" else [],
                         "null_value": NULL_COVARIATE, "range": list(COVARIATE_RANGE),
                         "scaling": dict(scaling or {}), "coordinates": bool(coordinates)},
        "latent": {"shape": [int(s) for s in latent_shape]},
        "image": {"orientation": "RAS", **dict(image)},
        "codec": {"file": Path(codec_path).name, "fingerprint": codec_fingerprint(codec["weights"], codec["meta"]),
                  "latent_scale": float(codec["weights"]["latent_scale"]),
                  "latent_shift": float(codec["weights"]["latent_shift"]), "kind": codec["meta"].get("kind")},
        "training": dict(training or {}),
    }


def coordinate_wrapper(coordinates: bool | Mapping[str, Any]) -> Callable[[Any], Any] | None:
    """``net -> AppendCoordinates(net)`` for a model with coordinate channels (a flag or a model meta), else None.

    The same function wraps the network in training (``DiffusionObjective(network_wrapper=...)``) and in sampling.
    """
    if isinstance(coordinates, Mapping):
        coordinates = bool((coordinates.get("conditioning") or {}).get("coordinates", False))
    if not coordinates:
        return None
    from meddiff3d.diffusion.conditioning import AppendCoordinates, CoordinateChannels

    return lambda net: AppendCoordinates(net, CoordinateChannels(spatial_dims=3))
