"""The official MONAI model-zoo brain LDM weights as meddiff3d model files.

The model-zoo bundle ``brain_image_synthesis_latent_diffusion_model`` (Pinaya et al. 2022, trained on UK Biobank T1
volumes) ships two bare state dicts, ``models/autoencoder.pt`` (``AutoencoderKL``) and ``models/model.pt``
(``DiffusionModelUNet``), with the key names of the retired MONAI GenerativeModels package. :func:`convert_model_zoo_ldm`
reads them (weights-only, :func:`~meddiff3d.engine.checkpoint.read_file`; old or current key names, converted by
MONAI's ``load_old_state_dict``)
and writes what :func:`meddiff3d.pipelines.generation.generate` reads:

* ``autoencoder.pt``: a codec file (:mod:`meddiff3d.models.codec`) with latent scale 1 and shift 0 -- the model-zoo
  sampler decodes the raw latents its U-Net produces (``decode_stage_2_outputs`` with its default scale factor 1);
* ``diffusion.pt``: the inference file with the meta of :func:`meddiff3d.models.ldm.latent_diffusion_meta`: the anchor
  U-Net spec, scaled-linear betas 0.0015-0.0205 with T = 1000, epsilon prediction, covariates
  ``sex, age, ventricular_volume, brain_volume`` (the model-zoo order: gender, age, ventricular volume, brain volume,
  each in [0, 1]) as both concatenated channels and cross-attention context (``conditioning="both"``), and
  ``training.cond_dropout = 0``: the anchor was trained without conditioning dropout, so ``generate`` refuses
  unconditional sampling and classifier-free guidance with it.

Image geometry. The model-zoo bundle generates 160x224x160 volumes and saves them with an identity affine; the paper
describes UK Biobank T1 images registered to MNI space at 1 mm. The crop offset within MNI space is not published, so
the files record 1 mm spacing, RAS labels and the affine of :func:`meddiff3d.data.images.canonical_affine`: the
160x224x160 box centred on meddiff3d's MNI-like box centre (``MNI_BOX_CENTRE_MM``). World coordinates of converted
outputs are therefore approximate (to the unknown crop, a few mm); check against an MNI template before relying on them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from meddiff3d.data.images import canonical_affine
from meddiff3d.engine.checkpoint import INFERENCE_FORMAT, build_network, file_sha256, read_file, save_file
from meddiff3d.errors import InputError
from meddiff3d.models.autoencoder import autoencoder_spec
from meddiff3d.models.codec import LatentCodec, save_codec
from meddiff3d.models.ldm import ANCHOR_SCHEDULE, BRAIN_COVARIATES, latent_diffusion_meta, latent_unet_spec
from meddiff3d.models.loading import load_model

__all__ = ["MODEL_ZOO_BUNDLE", "ANCHOR_IMAGE_SHAPE", "ANCHOR_SPACING", "read_state_dict", "load_model_zoo_weights",
           "convert_model_zoo_ldm"]

MODEL_ZOO_BUNDLE = "brain_image_synthesis_latent_diffusion_model"
ANCHOR_IMAGE_SHAPE = (160, 224, 160)
ANCHOR_SPACING = (1.0, 1.0, 1.0)
CODEC_NAME, DIFFUSION_NAME = "autoencoder.pt", "diffusion.pt"


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A bare state dict from ``path`` (weights-only); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    path = Path(path)
    data = read_file(path, what=f"{what} checkpoint", formats=None)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not (isinstance(data, Mapping) and data and all(torch.is_tensor(v) for v in data.values())):
        raise InputError(f"{what} checkpoint {path} is not a state dict (name -> tensor)")
    return {str(k).removeprefix("module."): v for k, v in data.items()}


def load_model_zoo_weights(network: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` (GenerativeModels or current MONAI key names) into ``network`` with its ``load_old_state_dict``;
    an :class:`InputError` naming ``source`` when the weights belong to another architecture."""
    own = network.state_dict()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MONAI prints "All keys match ..."
            network.load_old_state_dict(dict(state))
    except (KeyError, RuntimeError) as err:
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
        detail = f"shape mismatches: {', '.join(shapes[:4])}" if shapes else f"{type(err).__name__}: {err}"
        raise InputError(f"{source} does not fit {type(network).__name__} {describe(network)} (weights of a "
                         f"different architecture? pass its arguments); {detail}"[:2000]) from None


def describe(network: torch.nn.Module) -> str:
    return f"({sum(p.numel() for p in network.parameters()):,} parameters)"


def convert_model_zoo_ldm(
    autoencoder_pt: str | os.PathLike,
    diffusion_pt: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    autoencoder_args: Mapping[str, Any] | None = None,
    unet_args: Mapping[str, Any] | None = None,
    image_shape: Sequence[int] = ANCHOR_IMAGE_SHAPE,
    spacing: Sequence[float] = ANCHOR_SPACING,
) -> tuple[Path, Path]:
    """Convert the model-zoo checkpoints to ``out_dir/autoencoder.pt`` (codec) and ``out_dir/diffusion.pt``.

    Args:
        autoencoder_pt, diffusion_pt: the bundle's ``models/autoencoder.pt`` and ``models/model.pt``.
        autoencoder_args, unet_args: overrides of the anchor architectures (``autoencoder_spec("kl", "anchor")``,
            ``latent_unet_spec(3, BRAIN_COVARIATES, "both", "anchor")``); only for other checkpoints of the same
            classes (the tests use small ones).
        image_shape, spacing: image geometry (the anchor's 160x224x160 at 1 mm).

    Returns ``(codec_path, diffusion_path)``. Both inputs are read and checked before anything is written.
    """

    ae_state = read_state_dict(autoencoder_pt, "autoencoder")
    unet_state = read_state_dict(diffusion_pt, "diffusion model")
    ae_spec = autoencoder_spec("kl", "anchor", **dict(autoencoder_args or {}))
    autoencoder = build_network(ae_spec)
    load_model_zoo_weights(autoencoder, ae_state, f"autoencoder checkpoint {autoencoder_pt}")
    codec = LatentCodec(autoencoder, scale=1.0, shift=0.0).eval()
    try:
        latent_shape = list(codec.latent_shape(image_shape))
    except ValueError as err:
        raise InputError(str(err)) from None
    unet_spec = latent_unet_spec(codec.num_channels, BRAIN_COVARIATES, "both", "anchor", **dict(unet_args or {}))
    unet = build_network(unet_spec)
    load_model_zoo_weights(unet, unet_state, f"diffusion model checkpoint {diffusion_pt}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"bundle": f"MONAI model-zoo {MODEL_ZOO_BUNDLE}", "reference": "Pinaya et al. 2022, arXiv:2209.07162",
              "autoencoder": {"file": Path(autoencoder_pt).name, "sha256": file_sha256(autoencoder_pt)},
              "diffusion": {"file": Path(diffusion_pt).name, "sha256": file_sha256(diffusion_pt)}}
    image = {
        "shape": [int(s) for s in image_shape], "spacing": [float(s) for s in spacing],
        "affine": canonical_affine(image_shape, spacing).tolist(), "orientation": "RAS", "channels": 1,
        "affine_note": "the model-zoo bundle saves an identity affine; this is meddiff3d's MNI-like 160x224x160 box "
                       "at 1 mm (UK Biobank T1 registered to MNI space; crop offset unpublished, so approximate)",
        "normalisation": {"kind": "model-zoo UK Biobank preprocessing", "b_min": 0.0, "b_max": 1.0},
    }
    codec_path = save_codec(codec, out / CODEC_NAME, {
        "network": ae_spec, "kind": "kl", "image": image,
        "latent": {"shape": latent_shape, "channels": codec.num_channels, "downsample_factor": codec.downsample_factor,
                   "scale": 1.0, "shift": 0.0, "note": "raw latents, as the model-zoo sampler decodes them"},
        "source": source,
    })
    meta = latent_diffusion_meta(
        network=unet_spec, schedule={"type": "NoiseSchedule", **ANCHOR_SCHEDULE}, prediction="epsilon",
        covariates=BRAIN_COVARIATES, conditioning="both", latent_shape=latent_shape, image=image,
        codec=load_model(codec_path, "codec"),
        scaling={"note": "model-zoo covariates (gender, age, ventricular volume, brain volume), each scaled to "
                         "[0, 1] by the UK Biobank preprocessing; the exact ranges are not published with the bundle"},
        training={"source": source, "cond_dropout": 0.0,
                  "note": "trained without conditioning dropout: conditional sampling only, guidance_scale 1"},
    )
    diffusion_path = save_file({"format": INFERENCE_FORMAT, "iteration": 0,
                                "ema": {k: v.detach().cpu() for k, v in unet.state_dict().items()}, "meta": meta},
                               out / DIFFUSION_NAME)
    return codec_path, diffusion_path


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``meddiff3d convert-model-zoo AUTOENCODER_PT MODEL_PT OUT_DIR``."""
    parser.add_argument("autoencoder_pt", type=Path, help="the model-zoo bundle's models/autoencoder.pt")
    parser.add_argument("diffusion_pt", type=Path, help="the model-zoo bundle's models/model.pt")
    parser.add_argument("out_dir", type=Path, help=f"folder for {CODEC_NAME} (codec) and {DIFFUSION_NAME}")


def run(args: argparse.Namespace) -> int:
    codec, diffusion = convert_model_zoo_ldm(args.autoencoder_pt, args.diffusion_pt, args.out_dir)
    print(f"wrote {codec} and {diffusion}")
    return 0
