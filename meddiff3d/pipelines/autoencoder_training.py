"""Training a 3D autoencoder for latent diffusion: datalist -> random patches -> engine -> one latent codec file.

:func:`train_autoencoder` trains :class:`~meddiff3d.models.autoencoder.AutoencoderWithDiscriminator` with
:class:`~meddiff3d.models.autoencoder.AutoencoderObjective` (see :mod:`meddiff3d.models.autoencoder` for the design)
on random patches of the datalist's ``training`` T1 volumes, then calibrates the latent scale, measures PSNR / SSIM of
whole held-out volumes and writes the codec file (:mod:`meddiff3d.models.codec`) with its metrics beside it.

Patches are cut by the one patch sampler, :class:`~meddiff3d.data.patches.RandPatchd`, from the global torch RNG,
which the engine seeds and restores: with ``num_workers=0`` a killed and resumed run is bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from meddiff3d.checks import check_output_dir
from meddiff3d.data.patches import RandPatchd
from meddiff3d.engine.checkpoint import build_network
from meddiff3d.engine.recipes import training_summary
from meddiff3d.engine.trainer import DiffusionTrainer, seed_everything
from meddiff3d.models.autoencoder import (
    AutoencoderObjective,
    AutoencoderWithDiscriminator,
    autoencoder_spec,
    count_parameters,
    discriminator_spec,
    is_vq,
    optimizer_groups,
)
from meddiff3d.models.codec import LatentCodec, save_codec
from meddiff3d.pipelines.preflight import output_file

__all__ = ["train_autoencoder", "reconstruction_metrics", "metrics_path"]

#: the class path the engine's checkpoints of the trained network name (rebuilt by ``build_network``)
NETWORK_CLASS = f"{AutoencoderWithDiscriminator.__module__}.{AutoencoderWithDiscriminator.__qualname__}"


@torch.no_grad()
def reconstruction_metrics(codec: LatentCodec, volumes: Iterable[torch.Tensor]) -> dict:
    """PSNR and SSIM (data range 1) of ``decode(encode(x))`` against ``x`` for ``(1, 1, *shape)`` volumes, inside the
    brain and over the whole volume (:mod:`meddiff3d.engine.reconstruction_metrics`): means over volumes under
    ``psnr_brain``, ``ssim_brain``, ``psnr``, ``ssim``, and the per-volume values under ``<name>_per_volume``."""
    from meddiff3d.engine.reconstruction_metrics import reconstruction_scores

    rows = [reconstruction_scores(codec.decode(codec.encode(x)), x) for x in volumes]
    out: dict = {}
    for name in ("psnr_brain", "ssim_brain", "psnr", "ssim"):
        values = [row[name] for row in rows]
        out[name] = sum(values) / len(values) if values else None
        out[f"{name}_per_volume"] = values
    return out


def metrics_path(codec_out: str | Path) -> Path:
    """``<dir>/<stem>_metrics.json`` beside the codec file."""
    codec_out = Path(codec_out)
    return codec_out.with_name(codec_out.stem + "_metrics.json")


def _volumes(items: Sequence[Mapping], transform, n: int) -> Iterator[tuple[dict, torch.Tensor]]:
    """``(transformed item, image batch (1, C, *shape))`` for the first ``n`` items."""
    for item in list(items)[: max(0, int(n))]:
        data = transform(dict(item))
        image = data["image"]
        yield data, (image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)).float()[None]


def _sections(datalist: str | Path) -> tuple[list[dict], list[dict], dict]:
    from meddiff3d.data.datalist import load_datalist, read_datalist

    doc = read_datalist(datalist)
    train_items = load_datalist(datalist, "training", modalities=1, check_images="header")
    val = doc.get("validation")
    val_items = load_datalist(datalist, "validation", modalities=1, check_images="header") if val else []
    return train_items, val_items, doc


def _monitors(preview_patch: torch.Tensor):
    """``(reconstruct, validate)`` of the EMA network on one fixed patch: the preview and the ``psnr_patch`` value."""

    def reconstruct(ema_net: nn.Module) -> torch.Tensor:
        x = preview_patch.to(next(ema_net.parameters()).device)
        return ema_net.autoencoder.reconstruct(x) if not is_vq(ema_net.autoencoder) else ema_net.autoencoder(x)[0]

    def validate(ema_net: nn.Module) -> dict:
        x_hat = reconstruct(ema_net).float().cpu()
        mse = float((x_hat - preview_patch).pow(2).mean())
        return {"psnr_patch": 10 * math.log10(1.0 / max(mse, 1e-12))}

    return reconstruct, validate


def train_autoencoder(
    datalist: str | Path,
    run_dir: str | Path,
    *,
    codec_out: str | Path,
    kind: str = "kl",
    preset: str = "tiny",
    network: Mapping | None = None,
    discriminator: Mapping | None = None,
    patch_size: Sequence[int] = (64, 64, 64),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (160, 224, 160),
    batch_size: int = 2,
    max_iterations: int = 20000,
    lr: float = 1e-4,
    disc_lr: float | None = None,
    kl_weight: float = 1e-6,
    vq_weight: float = 1.0,
    adv_weight: float = 0.01,
    adv_warmup: int = 1000,
    perceptual_weight: float = 0.0,
    perceptual: Mapping | None = None,
    ema_decay: float = 0.999,
    checkpoint_every: int = 500,
    amp: str = "none",
    device: str = "auto",
    seed: int = 0,
    calibrate_volumes: int = 8,
    eval_volumes: int = 4,
    decode_tile: Sequence[int] | None = None,
    encode_tile: Sequence[int] | None = None,
    num_workers: int = 0,
    cache: bool = False,
    progress: bool = True,
) -> dict:
    """Train an autoencoder on random patches of the datalist's ``training`` T1 volumes, then write the codec file.

    Steps: train ``AutoencoderWithDiscriminator`` with :class:`AutoencoderObjective` in the engine (EMA, AMP,
    checkpoints every ``checkpoint_every`` steps; re-running the same call on a killed run resumes it; a finished run
    is not retrained) -> calibrate the latent scale/shift on the first ``calibrate_volumes`` full training volumes
    -> PSNR/SSIM of full reconstructions of the first ``eval_volumes`` validation volumes -> ``save_codec`` to
    ``codec_out`` with everything inference needs in its meta, and ``<codec_out stem>_metrics.json`` beside it.

    Args:
        network, discriminator: overrides of :func:`autoencoder_spec` ``(kind, preset)`` and
            :func:`discriminator_spec` ``(preset)`` arguments (literal values, as a bundle config writes them).
        adv_warmup: optimiser steps before the adversarial terms (and the discriminator) start.
        decode_tile, encode_tile: latent / image tile sizes used for calibration and evaluation (recorded in the meta
            as the recommended inference setting); ``None`` processes whole volumes.
        cache: cache the deterministic part of the transforms (whole volumes) in memory.

    Returns the metrics dict (also written as JSON; ``{}`` on ranks other than 0).
    """
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    from meddiff3d.data.transforms import t1_brain_transforms
    from meddiff3d.utils.io import save_json

    start = time.perf_counter()
    run_dir, codec_out = check_output_dir(run_dir, "run_dir"), output_file(codec_out, "codec_out")
    train_items, val_items, doc = _sections(datalist)
    ae_spec = autoencoder_spec(kind, preset, **dict(network or {}))
    d_spec = discriminator_spec(preset, **dict(discriminator or {})) if adv_weight > 0 else None
    seed_everything(seed)
    net = AutoencoderWithDiscriminator(ae_spec, d_spec)
    probe = LatentCodec(net.autoencoder)
    latent_shape = probe.latent_shape(shape)
    probe.latent_shape(patch_size)  # patches must divide by the downsampling factor too
    objective = AutoencoderObjective(kl_weight, adv_weight, adv_warmup=adv_warmup, vq_weight=vq_weight,
                                     perceptual_weight=perceptual_weight, perceptual=perceptual)

    full = t1_brain_transforms(spacing, shape, train=False)
    train_transform = Compose([full, RandPatchd(["image"], patch_size, label_key=None)])
    images = [{"image": item["image"]} for item in train_items]  # batches hold the patch and its corner only
    dataset = CacheDataset(images, train_transform, progress=False) if cache else Dataset(images, train_transform)
    preview_item = val_items[0] if val_items else train_items[0]
    preview_image = next(_volumes([preview_item], full, 1))[1]
    centre = [(s - p) // 2 for s, p in zip(shape, patch_size)]
    preview_patch = preview_image[(slice(None), slice(None), *(slice(c, c + p) for c, p in zip(centre, patch_size)))]
    reconstruct, validate = _monitors(preview_patch)

    losses = {"l1": 1.0, "kl_weight": kl_weight if kind == "kl" else None,
              "vq_weight": vq_weight if kind == "vq" else None,
              "adv_weight": adv_weight, "adv_warmup": adv_warmup, "adversarial": "least_squares",
              "perceptual_weight": perceptual_weight}
    meta = {"network": {"class": NETWORK_CLASS, "args": {"autoencoder": ae_spec, "discriminator": d_spec}},
            "kind": kind, "losses": losses, "patch_size": list(patch_size)}
    trainer = DiffusionTrainer(
        net, objective, dataset, run_dir=run_dir, max_iterations=max_iterations, batch_size=batch_size,
        optimizer=lambda _params: optimizer_groups(net, lr, disc_lr), ema_decay=ema_decay, amp=amp,
        checkpoint_every=checkpoint_every, seed=seed, meta=meta, device=device, num_workers=num_workers,
        preview_fn=reconstruct, preview_every=checkpoint_every, validate_fn=validate, validate_every=checkpoint_every,
        progress=progress, ddp_kwargs={"find_unused_parameters": d_spec is not None},
    )
    result = trainer.run()
    if result.rank != 0:
        return {}

    autoencoder = build_network(ae_spec)
    autoencoder.load_state_dict(result.ema.module.autoencoder.state_dict())
    codec = LatentCodec(autoencoder, decode_tile=decode_tile, encode_tile=encode_tile).to(trainer.device).eval()
    calibration = list(_volumes(train_items, full, calibrate_volumes))
    example_affine = calibration[0][0]["image"].affine.tolist()
    scale, shift = codec.calibrate(x.to(trainer.device) for _, x in calibration)
    del calibration
    held_out = (x.to(trainer.device) for _, x in _volumes(val_items, full, eval_volumes))
    evaluation = reconstruction_metrics(codec, held_out)

    datalist_path = Path(datalist)
    image_meta = {
        "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing], "orientation": "RAS", "channels": 1,
        "normalisation": {"kind": "percentile", "lower": 0.0, "upper": 99.5, "b_min": 0.0, "b_max": 1.0,
                          "clip": False, "transform": "meddiff3d.data.transforms.t1_brain_transforms"},
        "example_affine": example_affine,
    }
    summary = {
        "datalist": str(datalist_path.resolve()), "name": doc.get("name"),
        "datalist_sha256": hashlib.sha256(datalist_path.read_bytes()).hexdigest(),
        "n_training": len(train_items), "n_validation": len(val_items),
        "calibration_ids": [it.get("id") for it in train_items[:calibrate_volumes]],
        "evaluation_ids": [it.get("id") for it in val_items[:eval_volumes]],
    }
    codec_meta = {
        "network": ae_spec, "kind": kind, "image": image_meta,
        "latent": {"shape": list(latent_shape), "channels": codec.num_channels,
                   "downsample_factor": codec.downsample_factor, "scale": scale, "shift": shift,
                   "note": "z = (latent - shift) * scale; the values used are the codec weights' buffers"},
        "inference": {"decode_tile": list(decode_tile) if decode_tile else None,
                      "encode_tile": list(encode_tile) if encode_tile else None, "overlap": codec.overlap},
        "training": {**summary, "run_dir": str(run_dir.resolve()), "iterations": result.iteration,
                     "patch_size": list(patch_size), "batch_size": batch_size, "lr": lr, "disc_lr": disc_lr or lr,
                     "ema_decay": ema_decay, "losses": losses, "discriminator": d_spec, "seed": seed},
        "metrics": {name: evaluation[name] for name in ("psnr_brain", "ssim_brain", "psnr", "ssim")} | {
            "data_range": 1.0, "brain": "reference > 0 (meddiff3d.engine.reconstruction_metrics)"},
    }
    save_codec(codec, codec_out, codec_meta)
    metrics = training_summary(
        "autoencoder", result, codec_out, start, **evaluation, codec=str(codec_out), iterations=result.iteration,
        latent_scale=scale, latent_shift=shift, latent_shape=list(latent_shape),
        parameters=count_parameters(autoencoder), eval_volumes=len(evaluation["psnr_per_volume"]))
    save_json(metrics, metrics_path(codec_out))
    return metrics
