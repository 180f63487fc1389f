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

File of a trained model (``models/model.pt``, the engine's inference export, read with ``weights_only=True``)::

    {"format": "meddiff3d.inference/1", "iteration": int, "ema": state_dict,
     "meta": {"kind": "meddiff3d.latent_diffusion/1",     # "latent_diffusion" in files written before that tag
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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from meddiff3d.checks import parse_covariates
from meddiff3d.diffusion import (SAMPLERS, AppendCoordinates, ClassifierFreeGuidance, ConcatConditioning,
                                 CoordinateChannels, make_denoiser, schedule_from_dict)
from meddiff3d.engine.checkpoint import kind_tag
from meddiff3d.engine.precision import Autocast
from meddiff3d.errors import InputError
from meddiff3d.models.loading import LoadedModel, load_model

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
    "latent_diffusion_meta",
    "coordinate_wrapper",
    "check_codec_pair",
    "load_latent_diffusion",
    "check_guidance_support",
    "model_conditioning",
    "build_denoiser",
]

#: covariate names (and order) of the MONAI model-zoo brain LDM ("gender" there), all scaled to [0, 1]
BRAIN_COVARIATES = ("sex", "age", "ventricular_volume", "brain_volume")
#: the value of every covariate in the null (unconditional) condition: outside the real range [0, 1]
NULL_COVARIATE = -1.0
COVARIATE_RANGE = (0.0, 1.0)  # what meddiff3d.checks.parse_covariates accepts
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
    """``{"age": 0.5, ...}`` -> float32 ``(n,)`` in the order of ``names``; every name required, each in [0, 1]
    (:func:`meddiff3d.checks.parse_covariates` checks the values)."""
    if not isinstance(values, Mapping):
        raise InputError(f"{what} must be a mapping name -> value in [0, 1] (names: {', '.join(names)}), "
                         f"got {values!r}")
    numbers = parse_covariates(values, what) or {}
    unknown = [k for k in numbers if k not in names]
    if unknown:
        raise InputError(f"{what}: unknown covariate(s) {unknown}; this model knows {', '.join(names)}")
    missing = [n for n in names if n not in numbers]
    if missing:
        raise InputError(f"{what}: covariate(s) {missing} missing; give all of {', '.join(names)} "
                         "(or none at all for unconditional sampling)")
    return torch.tensor([numbers[n] for n in names], dtype=torch.float32)


def latent_diffusion_meta(*, network: Mapping[str, Any], schedule: Mapping[str, Any], prediction: str,
                          covariates: Sequence[str], conditioning: str, latent_shape: Sequence[int],
                          image: Mapping[str, Any], codec: Any,
                          scaling: Mapping[str, Any] | None = None,
                          training: Mapping[str, Any] | None = None, coordinates: bool = False,
                          sampling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The meta saved with a latent diffusion model (layout in the module docstring); the codec entry (fingerprint,
    latent scale and shift) comes from ``codec``, the loaded codec file
    (:func:`meddiff3d.models.loading.load_model` ``(path, "codec")``); ``sampling``: how the model is sampled by
    default (:func:`sampling_meta`)."""
    _check_mode(conditioning)
    for key in ("shape", "spacing", "affine"):
        if key not in image:
            raise InputError(f"latent diffusion meta: image geometry needs {key!r} (got {sorted(image)})")
    return {
        "kind": kind_tag("latent_diffusion"),
        "network": dict(network),
        "schedule": dict(schedule),
        "prediction": prediction,
        "conditioning": {"mode": conditioning, "covariates": list(covariates) if conditioning != "none" else [],
                         "null_value": NULL_COVARIATE, "range": list(COVARIATE_RANGE),
                         "scaling": dict(scaling or {}), "coordinates": bool(coordinates)},
        "latent": {"shape": [int(s) for s in latent_shape]},
        "image": {"orientation": "RAS", **dict(image)},
        "codec": {"file": codec.path.name, "fingerprint": codec.fingerprint,
                  "latent_scale": float(codec.network.latent_scale), "latent_shift": float(codec.network.latent_shift),
                  "kind": codec.meta.get("kind")},
        "training": dict(training or {}),
        **({"sampling": sampling_meta(sampling)} if sampling else {}),
    }


def sampling_meta(sampling: Mapping[str, Any]) -> dict[str, Any]:
    """A model's own sampling settings ``{"sampler", "steps"[, "spacing"]}``, checked: what the bundle's inference
    uses when its ``sampler`` / ``steps`` are null (e.g. the fastest configuration of equal quality in a
    quality-versus-steps table, or a distilled student's training grid)."""
    if not isinstance(sampling, Mapping) or set(sampling) - {"sampler", "steps", "spacing"} or \
            not {"sampler", "steps"} <= set(sampling):
        raise InputError(f"sampling must be {{sampler, steps[, spacing]}}, got {sampling!r}")
    if sampling["sampler"] not in SAMPLERS:
        raise InputError(f"sampling: unknown sampler {sampling['sampler']!r}; valid: {list(SAMPLERS)}")
    steps = sampling["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"sampling: steps must be an integer >= 1, got {steps!r}")
    return {"sampler": str(sampling["sampler"]), "steps": int(steps), "spacing": sampling.get("spacing")}


def coordinate_wrapper(coordinates: bool | Mapping[str, Any]) -> Callable[[Any], Any] | None:
    """``net -> AppendCoordinates(net)`` for a model with coordinate channels (a flag or a model meta), else None.

    The same function wraps the network in training (``DiffusionObjective(network_wrapper=...)``) and in sampling.
    """
    if isinstance(coordinates, Mapping):
        coordinates = bool((coordinates.get("conditioning") or {}).get("coordinates", False))
    if not coordinates:
        return None
    return lambda net: AppendCoordinates(net, CoordinateChannels(spatial_dims=3))


# ------------------------------------------------------------------------------------------------ inference
def check_codec_pair(codec: Any, diffusion: Any, *, check_fingerprint: bool = True) -> None:
    """Refuse a codec (loaded file) other than the one the diffusion model (loaded file) was trained with: by content
    fingerprint (``check_fingerprint=False`` skips it, e.g. to try a re-calibrated codec), and in any case when its
    latents do not have the shape the model expects."""
    meta = diffusion.meta
    expected = (meta.get("codec") or {}).get("fingerprint")
    if check_fingerprint and expected != codec.fingerprint:
        raise InputError(
            f"codec file {codec.path} is not the codec the diffusion model {diffusion.path} was trained with "
            f"(it expects {meta['codec'].get('file')!r}, fingerprint {str(expected)[:12]}...); pass the matching codec"
        )
    try:
        latent = list(codec.network.latent_shape(meta["image"]["shape"]))
    except ValueError as err:
        raise InputError(f"codec {codec.path}: {err}") from err
    if latent != list(meta["latent"]["shape"]):
        raise InputError(f"codec {codec.path} makes latents {latent}, the diffusion model expects "
                         f"{meta['latent']['shape']}")


def load_latent_diffusion(codec_path: Any, diffusion_path: Any, *, check_pair: bool = True,
                          device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                          decode_tile: Sequence[int] | None = None,
                          decode_split: int | None = None) -> tuple[LoadedModel, LoadedModel]:
    """``(codec, diffusion)``: both files loaded once by the one loader and checked to belong together
    (:func:`check_codec_pair`); with ``dtype`` the U-Net is readied for autocast (run it only through
    :func:`build_denoiser` with the same ``amp_dtype``) and the codec decodes in it, channels-last (anchor
    autoencoder, 3x10x14x10 latent, bf16, one thread: 11.4 s -> 9.7 s)."""
    options = {"split": decode_split} if decode_split else {}
    codec = load_model(codec_path, "codec", device=device, decode_tile=decode_tile, amp_dtype=dtype,
                       channels_last=dtype is not None, **options)
    diffusion = load_model(diffusion_path, "latent_diffusion", device=device, dtype=dtype)
    check_codec_pair(codec, diffusion, check_fingerprint=check_pair)
    return codec, diffusion


def check_guidance_support(meta: Mapping[str, Any], source: Any, *, conditional: bool, guidance_scale: float) -> None:
    """Refuse guidance and unconditional sampling where the model cannot give them a meaning.

    * ``guidance_scale != 1`` with unconditional sampling (the model's conditioning mode is ``"none"``, or
      ``conditional`` is false: covariates null): there is no condition to guide towards, and ignoring the scale
      would silently give an unguided sample;
    * a conditional model trained without conditioning dropout (``meta["training"]["cond_dropout"] == 0``, e.g. the
      converted model-zoo anchor) never saw the null condition: unconditional sampling and any guidance (which mixes
      in the null-condition prediction) would feed it an input it cannot interpret;
    * guidance on a student distilled with the teacher's guidance folded in (``meta["distillation"]
      ["guidance_scale"] != 1``): it would apply twice.

    ``source`` names the model in messages; ``conditional``: whether the request gives covariates.
    """
    mode = meta["conditioning"]["mode"]
    no_dropout = mode != "none" and (meta.get("training") or {}).get("cond_dropout", None) == 0
    if no_dropout and not conditional:
        raise InputError(f"diffusion model {source} was trained without conditioning dropout and cannot sample "
                         "unconditionally; give every covariate (" + ", ".join(meta["conditioning"]["covariates"])
                         + ")")
    if guidance_scale != 1.0 and (mode == "none" or not conditional):
        why = (f"the diffusion model {source} is unconditional" if mode == "none" else
               "covariates are null (give every covariate: " + ", ".join(meta["conditioning"]["covariates"]) + ")")
        raise InputError(f"guidance_scale={guidance_scale:g} needs conditional sampling: {why}; "
                         "leave guidance_scale at 1")
    if no_dropout and guidance_scale != 1.0:
        raise InputError(f"diffusion model {source} was trained without conditioning dropout, so classifier-free "
                         f"guidance is undefined for it; use guidance_scale 1 (got {guidance_scale:g})")
    folded = float((meta.get("distillation") or {}).get("guidance_scale", 1.0))
    if folded != 1.0 and guidance_scale != 1.0:
        raise InputError(f"diffusion model {source} was distilled with guidance {folded:g} folded in; sample it with "
                         f"guidance_scale 1 (got {guidance_scale:g})")


def model_conditioning(meta: Mapping[str, Any], covariates: torch.Tensor | None, batch: int,
                       device: torch.device | str) -> dict[str, torch.Tensor]:
    """Conditioning keywords for ``batch`` samples: covariates ``(n,)``, or the null condition for ``None``."""
    cond_meta = meta["conditioning"]
    n = len(cond_meta["covariates"])
    cov = torch.full((n,), float(cond_meta["null_value"])) if covariates is None else covariates
    return {k: v.to(device) for k, v in covariate_conditioning(cov.expand(batch, n), cond_meta["mode"]).items()}


def build_denoiser(network: Callable[..., torch.Tensor], meta: Mapping[str, Any], *, guidance_scale: float = 1.0,
                   conditional: bool = True, amp_dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """The denoiser ``(x, t, **cond) -> x0`` the samplers call, by wrapping (never branching inside the sampler)::

        network -> Autocast(amp_dtype) -> [AppendCoordinates] -> [ConcatConditioning("concat")]
          -> make_denoiser(schedule, prediction) -> [ClassifierFreeGuidance(scale, null condition)]
    """
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
