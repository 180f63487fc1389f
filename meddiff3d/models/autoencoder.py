"""3D autoencoders for latent diffusion: architecture specs, the adversarial training objective, and the training
recipe that ends in a latent codec file (:mod:`meddiff3d.models.codec`).

Architectures are MONAI networks described by JSON-able specs ``{"class": ..., "args": {...}}``
(:func:`autoencoder_spec`, :func:`discriminator_spec`): ``AutoencoderKL`` without attention (fully convolutional, so
it trains on patches and runs on whole volumes) or ``VQVAE``, each in a ``"tiny"`` CPU preset and a large preset
(for KL the MONAI model-zoo ``brain_image_synthesis_latent_diffusion_model`` autoencoder, Pinaya et al. 2022).

Training fits the generic engine (one objective, one backward, one optimiser) with this design:

* the trained network is :class:`AutoencoderWithDiscriminator`: the autoencoder, a MONAI ``PatchDiscriminator`` and
  a step-counter buffer (checkpointed with the weights, so the adversarial warm-up survives a resume exactly);
* its ``forward(image)`` returns the reconstruction, the per-sample regulariser (KL or VQ loss) and three sets of
  discriminator logits: ``D(reconstruction)`` through :func:`torch.func.functional_call` with *detached* discriminator
  parameters (the generator's adversarial term: gradients reach the autoencoder only), ``D(reconstruction.detach())``
  and ``D(image)`` (the discriminator's terms: gradients reach the discriminator only). Everything runs inside
  ``forward``, so DistributedDataParallel sees one ordinary forward/backward;
* :class:`AutoencoderObjective` turns that into a per-sample loss: L1 + kl_weight * KL (or vq_weight * VQ loss)
  + perceptual_weight * perceptual (off by default) + adv_weight * (generator LSGAN term + discriminator LSGAN term).
  The two adversarial terms touch disjoint parameters, so summing them is the usual alternating GAN update done in
  one step (Adam per parameter group, the discriminator's learning rate set separately).

Patches are cropped by :class:`RandomPatchd` from the global torch RNG, which the engine seeds and restores: with
``num_workers=0`` a killed and resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from monai.transforms import MapTransform, RandomizableTrait
from torch import nn

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError
from meddiff3d.models.codec import LatentCodec, save_codec

KINDS = ("kl", "vq")
AUTOENCODER_CLASSES = {"kl": "monai.networks.nets.AutoencoderKL", "vq": "monai.networks.nets.VQVAE"}
DISCRIMINATOR_CLASS = "monai.networks.nets.PatchDiscriminator"

#: architecture presets; "tiny": ~1.4 M parameters, x8 downsampling, 3 latent channels (160x224x160 -> 3x20x28x20)
AUTOENCODER_PRESETS: dict[str, dict[str, dict]] = {
    "kl": {
        "tiny": {"channels": [16, 32, 64, 64], "num_res_blocks": 1, "norm_num_groups": 8},
        # the MONAI model-zoo brain LDM autoencoder (brain_image_synthesis_latent_diffusion_model)
        "anchor": {"channels": [64, 128, 128, 128], "num_res_blocks": 2, "norm_num_groups": 32},
    },
    "vq": {
        "tiny": {"channels": [16, 32, 64], "num_res_layers": 1, "num_res_channels": [16, 32, 64]},
        # MONAI VQVAE defaults (Tudosiu et al. 2022) with a 3-channel embedding for latent diffusion
        "anchor": {"channels": [96, 96, 192], "num_res_layers": 3, "num_res_channels": [96, 96, 192]},
    },
}
_KL_COMMON = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 3, "norm_eps": 1e-6,
              "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False}
_VQ_COMMON = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "embedding_dim": 3, "num_embeddings": 256,
              "commitment_cost": 0.25, "downsample_parameters": [[2, 4, 1, 1]] * 3,
              "upsample_parameters": [[2, 4, 1, 1, 0]] * 3}
DISCRIMINATOR_PRESETS = {
    "tiny": {"spatial_dims": 3, "num_layers_d": 3, "channels": 16, "in_channels": 1, "out_channels": 1,
             "norm": "INSTANCE"},
    "anchor": {"spatial_dims": 3, "num_layers_d": 3, "channels": 32, "in_channels": 1, "out_channels": 1,
               "norm": "INSTANCE"},
}  # fmt: skip


def autoencoder_spec(kind: str = "kl", preset: str = "tiny", **overrides: Any) -> dict:
    """``{"class": ..., "args": {...}}`` of a 3D autoencoder; ``overrides`` replace preset arguments.

    KL: MONAI ``AutoencoderKL`` without attention (``attention_levels`` follows ``channels``: all ``False``). VQ: MONAI
    ``VQVAE`` with three stride-2 levels and a 3-channel, 256-entry codebook. Both downsample by 8.
    """
    if kind not in KINDS:
        raise InputError(f"autoencoder kind must be one of {KINDS}, got {kind!r}")
    if preset not in AUTOENCODER_PRESETS[kind]:
        known = sorted(AUTOENCODER_PRESETS[kind])
        raise InputError(f"{kind} autoencoder preset must be one of {known}, got {preset!r}")
    args = copy.deepcopy({**(_KL_COMMON if kind == "kl" else _VQ_COMMON), **AUTOENCODER_PRESETS[kind][preset]})
    args.update(copy.deepcopy(overrides))
    if kind == "kl" and "attention_levels" not in overrides:
        args["attention_levels"] = [False] * len(args["channels"])
    return {"class": AUTOENCODER_CLASSES[kind], "args": args}


def discriminator_spec(preset: str = "tiny", **overrides: Any) -> dict:
    """``{"class": "monai.networks.nets.PatchDiscriminator", "args": {...}}`` (instance norm: per-sample logits).

    ``num_layers_d`` must leave more than one voxel per axis for instance norm: 3 needs patches >= 32, 2 >= 16.
    """
    if preset not in DISCRIMINATOR_PRESETS:
        raise InputError(f"discriminator preset must be one of {sorted(DISCRIMINATOR_PRESETS)}, got {preset!r}")
    return {"class": DISCRIMINATOR_CLASS, "args": {**DISCRIMINATOR_PRESETS[preset], **copy.deepcopy(overrides)}}


def _module(spec_or_module: Mapping | nn.Module) -> nn.Module:
    return spec_or_module if isinstance(spec_or_module, nn.Module) else build_network(spec_or_module)


def is_vq(autoencoder: nn.Module) -> bool:
    return hasattr(autoencoder, "quantizer")


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(N(mu, sigma^2) || N(0, 1)), summed over latent channels and voxels: ``(B,)``."""
    var = z_sigma.float().pow(2)
    return 0.5 * (z_mu.float().pow(2) + var - torch.log(var) - 1).flatten(1).sum(1)


class AutoencoderWithDiscriminator(nn.Module):
    """What the engine trains: ``autoencoder`` + optional ``discriminator`` + ``training_forwards`` (a buffer).

    Args:
        autoencoder, discriminator: modules or specs (``{"class", "args"}``); as specs, the engine's checkpoints of this
            module are rebuilt by :func:`~meddiff3d.engine.checkpoint.build_network`.

    ``training_forwards`` counts forward passes in training mode (optimiser steps times gradient accumulation); it is
    part of the ``state_dict``, so warm-ups that read it resume exactly.
    """

    def __init__(self, autoencoder: Mapping | nn.Module, discriminator: Mapping | nn.Module | None = None) -> None:
        super().__init__()
        self.autoencoder = _module(autoencoder)
        self.discriminator = None if discriminator is None else _module(discriminator)
        self.register_buffer("training_forwards", torch.zeros((), dtype=torch.long))

    def forward(self, image: torch.Tensor, adversarial: bool = True) -> dict[str, torch.Tensor]:
        """``{"reconstruction", "regulariser" (B,)}`` plus, if ``adversarial`` and a discriminator exists, the logits
        ``"fake_for_generator"`` (detached D parameters), ``"fake_for_discriminator"`` (detached input), ``"real"``."""
        if self.training:
            self.training_forwards += 1
        ae = self.autoencoder
        if is_vq(ae):
            reconstruction, vq_loss = ae(image)
            regulariser = vq_loss.float().reshape(()).expand(image.shape[0])  # MONAI's VQ loss is a batch mean
        else:
            reconstruction, z_mu, z_sigma = ae(image)
            regulariser = kl_divergence(z_mu, z_sigma)
        out = {"reconstruction": reconstruction, "regulariser": regulariser}
        if adversarial and self.discriminator is not None:
            disc = self.discriminator
            frozen = {name: p.detach() for name, p in disc.named_parameters()}
            frozen.update(dict(disc.named_buffers()))
            out["fake_for_generator"] = torch.func.functional_call(disc, frozen, (reconstruction,))[-1]
            out["fake_for_discriminator"] = disc(reconstruction.detach())[-1]
            out["real"] = disc(image)[-1]
        return out


def _unwrap(network: nn.Module) -> nn.Module:
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def build_perceptual_loss(options: Mapping | None) -> nn.Module:
    """MONAI ``PerceptualLoss`` from local weights only: nothing is downloaded at run time.

    ``options``: ``{"pretrained_path": <torchvision ResNet-50 state dict, e.g. RadImageNet>, "fake_3d_ratio": 0.2,
    "pretrained_state_dict_key": None}`` (2.5D: slices along each axis). Other MONAI perceptual networks
    (LPIPS, MedicalNet, RadImageNet via torch.hub) download their weights and are refused.
    """
    options = dict(options or {})
    path = options.pop("pretrained_path", None)
    if not path or not Path(path).is_file():
        raise InputError(
            "perceptual_weight > 0 needs perceptual={'pretrained_path': <local ResNet-50 state dict>} (weights are "
            f"never downloaded at run time); got pretrained_path={path!r}"
        )
    try:
        import torchvision  # noqa: F401
    except ImportError as err:
        raise InputError("the perceptual loss needs torchvision, which is not installed") from err
    from monai.losses import PerceptualLoss

    loss = PerceptualLoss(spatial_dims=3, network_type="resnet50", is_fake_3d=True, pretrained=True,
                          pretrained_path=str(path), fake_3d_ratio=float(options.pop("fake_3d_ratio", 0.2)),
                          pretrained_state_dict_key=options.pop("pretrained_state_dict_key", None))
    if options:
        raise InputError(f"unknown perceptual options {sorted(options)}")
    return loss.eval().requires_grad_(False)


class AutoencoderObjective(nn.Module):
    """``objective(network, batch) -> per-sample loss (B,)`` for an :class:`AutoencoderWithDiscriminator`.

    loss = L1(x, x_hat) + kl_weight * KL (KL) or vq_weight * VQ loss (VQ) + perceptual_weight * perceptual
    + adv_weight * [LS(D(x_hat), real) (generator) + 0.5 * (LS(D(x_hat.detach()), fake) + LS(D(x), real)) (D)],
    LS being MONAI's least-squares ``PatchAdversarialLoss``. The adversarial terms start after ``adv_warmup``
    training forward passes (read from the network's ``training_forwards`` buffer); before that the discriminator is
    not run. The VQ and perceptual losses are batch means in MONAI, so they enter every sample equally.
    """

    def __init__(self, kl_weight: float = 1e-6, adv_weight: float = 0.01, *, adv_warmup: int = 0,
                 vq_weight: float = 1.0, perceptual_weight: float = 0.0, perceptual: Mapping | None = None) -> None:
        super().__init__()
        from monai.losses import PatchAdversarialLoss

        self.kl_weight, self.vq_weight, self.adv_weight = float(kl_weight), float(vq_weight), float(adv_weight)
        self.adv_warmup, self.perceptual_weight = int(adv_warmup), float(perceptual_weight)
        self.adversarial = PatchAdversarialLoss(reduction="none", criterion="least_squares")
        self.perceptual = build_perceptual_loss(perceptual) if self.perceptual_weight > 0 else None

    def _ls(self, logits: torch.Tensor, real: bool, for_discriminator: bool) -> torch.Tensor:
        loss = self.adversarial(logits.float(), target_is_real=real, for_discriminator=for_discriminator)[0]
        return loss.flatten(1).mean(1)

    def terms(self, network: nn.Module, batch: Mapping) -> dict[str, torch.Tensor]:
        """The weighted per-sample terms ``reconstruction, regulariser, perceptual, generator, discriminator``."""
        image = batch["image"]
        bare = _unwrap(network)
        adversarial = self.adv_weight > 0 and int(bare.training_forwards) >= self.adv_warmup
        out = network(image, adversarial=adversarial)
        x_hat = out["reconstruction"].float()
        zero = x_hat.new_zeros(image.shape[0])
        reg_weight = self.vq_weight if is_vq(bare.autoencoder) else self.kl_weight
        terms = {
            "reconstruction": (x_hat - image.float()).abs().flatten(1).mean(1),
            "regulariser": reg_weight * out["regulariser"],
            "perceptual": zero,
            "generator": zero,
            "discriminator": zero,
        }
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual_weight * self.perceptual(x_hat, image.float()).expand_as(zero)
        if "fake_for_generator" in out:
            terms["generator"] = self.adv_weight * self._ls(out["fake_for_generator"], True, False)
            d_fake = self._ls(out["fake_for_discriminator"], False, True)
            d_real = self._ls(out["real"], True, True)
            terms["discriminator"] = self.adv_weight * 0.5 * (d_fake + d_real)
        return terms

    def forward(self, network: nn.Module, batch: Mapping) -> torch.Tensor:
        return torch.stack(list(self.terms(network, batch).values())).sum(0)


def optimizer_groups(network: AutoencoderWithDiscriminator, lr: float, disc_lr: float | None = None,
                     betas: Sequence[float] = (0.5, 0.9)) -> torch.optim.Optimizer:
    """Adam with one parameter group for the autoencoder (``lr``) and one for the discriminator (``disc_lr``)."""
    groups = [{"params": list(network.autoencoder.parameters()), "lr": float(lr)}]
    if network.discriminator is not None:
        groups.append({"params": list(network.discriminator.parameters()), "lr": float(disc_lr or lr)})
    return torch.optim.Adam(groups, lr=float(lr), betas=tuple(betas))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------ training recipe
class RandomPatchd(MapTransform, RandomizableTrait):
    """``{"image": (C, *shape)} -> {"image": (C, *patch_size)}``, a random crop drawn from the global torch RNG.

    The engine seeds that RNG and restores it on resume, so with ``num_workers=0`` the patches of a resumed run are
    those of the uninterrupted run (MONAI's ``RandSpatialCropd`` keeps a private, unrestored ``RandomState``). With
    workers, each per-epoch loader seeds its workers deterministically; a resume is exact again from the next epoch.
    """

    def __init__(self, patch_size: Sequence[int], key: str = "image") -> None:
        super().__init__([key])
        self.patch_size, self.key = tuple(int(p) for p in patch_size), key

    def __call__(self, data: Mapping) -> dict:
        image = torch.as_tensor(data[self.key])
        shape = image.shape[1:]
        if any(p > s for p, s in zip(self.patch_size, shape)):
            raise InputError(f"patch size {self.patch_size} is larger than the image {tuple(shape)}")
        starts = [int(torch.randint(0, s - p + 1, ())) for s, p in zip(shape, self.patch_size)]
        index = (slice(None), *(slice(a, a + p) for a, p in zip(starts, self.patch_size)))
        return {self.key: image[index].contiguous()}


@torch.no_grad()
def reconstruction_metrics(codec: LatentCodec, volumes: Iterable[torch.Tensor]) -> dict:
    """PSNR and SSIM (MONAI metrics, data range 1) of ``decode(encode(x))`` against ``x`` for ``(1, 1, *shape)``
    volumes: ``{"psnr", "ssim", "psnr_per_volume", "ssim_per_volume"}`` (means over volumes)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    psnr_metric, ssim_metric = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
    psnr, ssim = [], []
    for x in volumes:
        x_hat = codec.decode(codec.encode(x)).to(x.dtype)
        psnr.append(float(psnr_metric(x_hat, x).mean()))
        ssim.append(float(ssim_metric(x_hat, x).mean()))
    if not psnr:
        return {"psnr": None, "ssim": None, "psnr_per_volume": [], "ssim_per_volume": []}
    return {"psnr": sum(psnr) / len(psnr), "ssim": sum(ssim) / len(ssim), "psnr_per_volume": psnr,
            "ssim_per_volume": ssim}


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

    Returns the metrics dict (also written as JSON).
    """
    from monai.data import CacheDataset, Dataset
    from monai.transforms import Compose

    from meddiff3d.data.transforms import t1_brain_transforms
    from meddiff3d.engine.trainer import DiffusionTrainer, seed_everything
    from meddiff3d.utils.io import save_json

    start = time.perf_counter()
    run_dir, codec_out = Path(run_dir), Path(codec_out)
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
    train_transform = Compose([full, RandomPatchd(patch_size)])
    dataset = (CacheDataset(train_items, train_transform, progress=False) if cache
               else Dataset(train_items, train_transform))
    preview_item = val_items[0] if val_items else train_items[0]
    preview_image = next(_volumes([preview_item], full, 1))[1]
    centre = [(s - p) // 2 for s, p in zip(shape, patch_size)]
    preview_patch = preview_image[(slice(None), slice(None), *(slice(c, c + p) for c, p in zip(centre, patch_size)))]

    def reconstruct(ema_net: nn.Module) -> torch.Tensor:
        x = preview_patch.to(next(ema_net.parameters()).device)
        return ema_net.autoencoder.reconstruct(x) if not is_vq(ema_net.autoencoder) else ema_net.autoencoder(x)[0]

    def validate(ema_net: nn.Module) -> dict:
        x_hat = reconstruct(ema_net).float().cpu()
        mse = float((x_hat - preview_patch).pow(2).mean())
        return {"psnr_patch": 10 * math.log10(1.0 / max(mse, 1e-12))}

    losses = {"l1": 1.0, "kl_weight": kl_weight if kind == "kl" else None,
              "vq_weight": vq_weight if kind == "vq" else None,
              "adv_weight": adv_weight, "adv_warmup": adv_warmup, "adversarial": "least_squares",
              "perceptual_weight": perceptual_weight}
    meta = {"network": {"class": f"{__name__}.AutoencoderWithDiscriminator",
                        "args": {"autoencoder": ae_spec, "discriminator": d_spec}},
            "kind": kind, "losses": losses, "patch_size": list(patch_size)}
    trainer = DiffusionTrainer(
        net, objective, dataset, run_dir=run_dir, max_iterations=max_iterations, batch_size=batch_size,
        optimizer=lambda _params: optimizer_groups(net, lr, disc_lr), ema_decay=ema_decay, amp=amp,
        checkpoint_every=checkpoint_every, seed=seed, meta=meta, device=device, num_workers=num_workers,
        preview_fn=reconstruct, preview_every=checkpoint_every, validate_fn=validate, validate_every=checkpoint_every,
        progress=progress, ddp_kwargs={"find_unused_parameters": d_spec is not None},
    )
    result = trainer.run()
    if not trainer.dist.is_main:
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
        "metrics": {"psnr": evaluation["psnr"], "ssim": evaluation["ssim"], "data_range": 1.0},
    }
    save_codec(codec, codec_out, codec_meta)
    metrics = {
        **evaluation, "codec": str(codec_out), "iterations": result.iteration, "resumed_from": result.resumed_from,
        "last_loss": result.last_loss, "latent_scale": scale, "latent_shift": shift, "latent_shape": list(latent_shape),
        "parameters": count_parameters(autoencoder), "eval_volumes": len(evaluation["psnr_per_volume"]),
        "seconds": time.perf_counter() - start,
    }
    save_json(metrics, metrics_path(codec_out))
    return metrics


def metrics_path(codec_out: str | Path) -> Path:
    """``<dir>/<stem>_metrics.json`` beside the codec file."""
    codec_out = Path(codec_out)
    return codec_out.with_name(codec_out.stem + "_metrics.json")
