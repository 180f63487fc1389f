"""3D autoencoders for latent diffusion: architecture specs, presets, the trained network and its adversarial
objective. The training recipe that ends in a latent codec file (:mod:`meddiff3d.models.codec`) is
:func:`meddiff3d.pipelines.autoencoder_training.train_autoencoder`.

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
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError

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
