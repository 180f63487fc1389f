"""Training the latent diffusion model: cached latents -> ``DiffusionObjective`` -> ``DiffusionTrainer`` -> one file.

``train_latent_diffusion(codec, datalist, run_dir, out=...)`` encodes the datalist once (:mod:`.latents`), trains a
``DiffusionModelUNet`` on the normalised latents with conditioning dropout (so one model samples conditionally and
unconditionally), and writes ``out``: the engine's inference export (EMA weights) whose meta holds everything
generation needs (see :mod:`meddiff3d.models.ldm`). Re-running on the same ``run_dir`` resumes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any


from meddiff3d.checks import check_output_dir
from meddiff3d.diffusion import DiffusionObjective, schedule_from_dict
from meddiff3d.engine import build_network, seed_everything, train
from meddiff3d.engine.recipes import publish_inference, trainer_settings, training_summary
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import (
    ANCHOR_SCHEDULE,
    BRAIN_COVARIATES,
    coordinate_wrapper,
    covariate_conditioning,
    latent_diffusion_meta,
    latent_unet_spec,
    null_condition,
    sampling_meta,
)
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.preflight import output_file
from meddiff3d.pipelines.generation import preview_sampler
from meddiff3d.pipelines.latents import encode_latents

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["TRAINER_DEFAULTS", "train_latent_diffusion", "network_spec"]

#: trainer settings of this recipe unless given (any other DiffusionTrainer keyword keeps the trainer's default)
TRAINER_DEFAULTS = {"batch_size": 2, "max_iterations": 100_000, "lr": 2.5e-5, "ema_decay": 0.9999, "amp": "auto",
                    "grad_clip": 1.0, "device": "auto", "seed": 0, "checkpoint_every": 1000, "log_every": 10,
                    "progress": True}


def network_spec(network: str | Mapping[str, Any] | None, latent_channels: int, covariates: Sequence[str],
                 conditioning: str, overrides: Mapping[str, Any] | None = None, *,
                 coordinates: bool = False) -> dict[str, Any]:
    """A full network spec from a preset name (``"anchor"``, ``"tiny_cpu"``, ``"test"``) plus ``overrides``, or a
    full ``{"class", "args"}`` spec checked against the latent channels and conditioning."""
    if network is None or isinstance(network, str):
        return latent_unet_spec(latent_channels, covariates, conditioning, network or "anchor",
                                coordinates=coordinates, **dict(overrides or {}))
    if not isinstance(network, Mapping) or "class" not in network:
        raise InputError(f"network must be a preset name or a {{'class', 'args'}} spec, got {network!r}")
    spec = {"class": network["class"], "args": {**dict(network.get("args") or {}), **dict(overrides or {})}}
    expected = latent_unet_spec(latent_channels, covariates, conditioning, coordinates=coordinates)["args"]
    for key in ("in_channels", "out_channels", "with_conditioning", "cross_attention_dim"):
        if key in expected and spec["args"].get(key, expected[key]) != expected[key]:
            raise InputError(f"network args {key}={spec['args'][key]!r} do not fit {latent_channels} latent channels "
                             f"with {conditioning!r} conditioning on {len(covariates)} covariates "
                             f"(expected {expected[key]!r}; leave it out to have it derived)")
        if key in expected:
            spec["args"][key] = expected[key]
    return spec


def train_latent_diffusion(
    codec: str | os.PathLike,
    datalist: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike,
    covariates: Sequence[str] = BRAIN_COVARIATES,
    conditioning: str = "both",
    network: str | Mapping[str, Any] | None = "anchor",
    network_overrides: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    prediction: str = "epsilon",
    cond_dropout: float = 0.15,
    coordinates: bool = False,
    min_snr_gamma: float | None = None,
    section: str = "training",
    spacing: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    sampling: Mapping[str, Any] | None = None,
    **trainer: Any,
) -> dict[str, Any]:
    """Train a covariate-conditioned latent diffusion model; returns a summary dict (see module docstring).

    Args:
        codec: the codec file (``meddiff3d.models.codec.save_codec``) whose latents the model learns.
        datalist: datalist JSON; ``section`` items are encoded (each needs every name of ``covariates``).
        run_dir: checkpoints, logs, the latent cache (``RUN_DIR/latents/``); a checkpoint there is resumed.
        out: where the trained model goes (EMA weights + meta), e.g. ``models/model.pt``.
        covariates: names, in the order the network sees them (values in [0, 1]).
        conditioning: ``"both"``, ``"concat"``, ``"crossattn"`` or ``"none"`` (see :mod:`meddiff3d.models.ldm`).
        network: a U-Net preset name or a full spec; ``network_overrides`` replace preset arguments.
        schedule: the noise schedule's ``to_dict()`` form: :class:`NoiseSchedule` arguments (default: the anchor's
            scaled-linear 0.0015-0.0205, T=1000) or ``{"type": "FlowSchedule", ...}`` for rectified flow
            (with ``prediction="flow"``).
        cond_dropout: probability of training a sample with the null condition (classifier-free guidance).
        coordinates: append coordinate channels to the U-Net input (see :mod:`meddiff3d.models.ldm`).
        sampling: ``{"sampler", "steps"[, "spacing"]}`` saved in the model's meta: how the bundle's inference samples
            it by default (:func:`meddiff3d.models.ldm.sampling_meta`); ``None``: the default of its schedule type.
        trainer: settings of :class:`~meddiff3d.engine.DiffusionTrainer` (``batch_size``, ``max_iterations``, ``lr``,
            ``ema_decay``, ``amp``, ``device``, ``seed``, ``checkpoint_every``, ``preview_every``, ...) over
            :data:`TRAINER_DEFAULTS`; an unknown name is refused.
    """
    start = time.perf_counter()
    settings = trainer_settings(TRAINER_DEFAULTS, trainer, "latent diffusion training")
    batch_size, lr, seed, progress = (settings[k] for k in ("batch_size", "lr", "seed", "progress"))
    run_dir, out = check_output_dir(run_dir, "run_dir"), output_file(out, "out")  # before any compute
    covariates = list(covariates) if conditioning != "none" else []
    if conditioning != "none" and not covariates:
        raise InputError(f"conditioning {conditioning!r} needs covariate names")
    schedule_obj = schedule_from_dict(dict(schedule or ANCHOR_SCHEDULE))
    sampling = sampling_meta(sampling) if sampling else None  # checked, as the objective, before encoding
    objective = DiffusionObjective(schedule_obj, prediction, min_snr_gamma=min_snr_gamma,
                                   cond_dropout=cond_dropout if conditioning != "none" else 0.0,
                                   null_cond=null_condition(len(covariates), conditioning),
                                   network_wrapper=coordinate_wrapper(coordinates))
    codec_file = load_model(codec, "codec")  # read once: encoder for the latents, fingerprint for the meta
    latent_set = encode_latents(codec_file, datalist, run_dir / "latents", covariates=covariates, section=section,
                                spacing=spacing, shape=shape, device="cpu", progress=progress)
    latent_channels = int(latent_set.latents.shape[1])
    spec = network_spec(network, latent_channels, covariates, conditioning, network_overrides,
                        coordinates=coordinates)
    meta = latent_diffusion_meta(
        network=spec, schedule=schedule_obj.to_dict(), prediction=prediction, covariates=covariates,
        conditioning=conditioning, latent_shape=latent_set.latents.shape[1:], image=latent_set.image, codec=codec_file,
        scaling=latent_set.covariate_scaling, coordinates=coordinates, sampling=sampling,
        training={"datalist": str(datalist), "section": section, "num_volumes": len(latent_set.ids),
                  "cond_dropout": cond_dropout, "batch_size": batch_size, "lr": lr, "seed": seed,
                  "min_snr_gamma": min_snr_gamma, "max_iterations": settings["max_iterations"]})
    conditioning_fn = partial(covariate_conditioning, mode=conditioning)
    seed_everything(seed)  # the initial weights are a function of the seed
    net = build_network(spec)
    if settings.get("preview_every"):
        settings["preview_fn"] = preview_sampler(codec_file, meta)
    result = train(net, objective, latent_set.items(conditioning_fn), run_dir=run_dir, meta=meta, **settings)

    publish_inference(result, out)
    return training_summary("latent diffusion", result, out, start, num_volumes=len(latent_set.ids),
                            latent_shape=meta["latent"]["shape"], latent_cache=str(latent_set.path),
                            latent_cache_reused=latent_set.reused)
