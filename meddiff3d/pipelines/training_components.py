"""What a bundle's training config declares besides ``run``: MONAI's training-workflow components, by factory.

``monai.bundle.ConfigWorkflow(workflow_type="train").check_properties()`` asks a training config for ``bundle_root``,
``device``, ``dataset_dir`` and the components ``train#dataset`` (``train#preprocessing`` as its transform),
``train#inferer`` (what runs the network in training) and ``train#trainer`` (with ``max_epochs``). In a meddiff3d
bundle the training is one recipe call (``run``: :mod:`meddiff3d.pipelines.commands`); these components state what
that recipe trains on and with, built from the same config keys:

=========================  ==========================================================================================
``train#preprocessing``    the recipe's deterministic transforms (``t1_brain_transforms`` / ``brats_transforms``)
``train#dataset``          :class:`~meddiff3d.pipelines.components.DatalistDataset`: the section the recipe trains on
                           (read on first use, not when the config is parsed)
``train#inferer``          the recipe's training objective: :func:`latent_diffusion_objective`,
                           :func:`latent_distillation_objective`, :func:`segmentation_objective`,
                           :func:`image_diffusion_objective`,
                           ``meddiff3d.models.autoencoder.AutoencoderObjective``
``train#trainer``          :class:`RecipeTrainer`: the recipe's step budget; ``max_epochs`` (MONAI's unit) becomes the
                           ``max_iterations`` that ``run`` reads (``$@train#trainer.max_iterations``)
``network_def``            the untrained network the recipe builds from the same settings (:func:`autoencoder_network`,
                           :func:`latent_diffusion_network`, :func:`segmentation_network`,
                           :func:`image_diffusion_network`); parsed only when asked for
=========================  ==========================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from meddiff3d.diffusion import CoordinateChannels, DiffusionObjective, schedule_from_dict
from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError
from meddiff3d.models.autoencoder import autoencoder_spec
from meddiff3d.models.image_diffusion import IMAGE_SCHEDULE, class_labels, datalist_classes, image_unet_spec
from meddiff3d.models.ldm import ANCHOR_SCHEDULE, coordinate_wrapper, null_condition
from meddiff3d.models.segdiff import SEGDIFF_SCHEDULE, segdiff_unet_spec

__all__ = ["RecipeTrainer", "latent_diffusion_objective", "latent_distillation_objective", "segmentation_objective",
           "autoencoder_network", "latent_diffusion_network", "segmentation_network",
           "NullClass", "image_diffusion_objective", "image_diffusion_network"]


class RecipeTrainer:
    """``train#trainer``: the optimiser-step budget of the recipe a bundle's ``run`` calls.

    The recipes count optimiser steps (``max_iterations``); MONAI's training properties count epochs
    (``train#trainer#max_epochs``). ``max_epochs=None`` keeps ``max_iterations``; an integer trains that many passes
    over ``dataset``: ``max_epochs * ((len(dataset) // world_size) // batch_size)`` steps, whole batches per rank as
    the engine draws them (``world_size`` from ``WORLD_SIZE`` under torchrun), at least one per epoch."""

    def __init__(self, *, max_iterations: int, batch_size: int = 1, max_epochs: int | None = None,
                 dataset: Any = None) -> None:
        if max_epochs is not None and (isinstance(max_epochs, bool) or int(max_epochs) != max_epochs
                                       or max_epochs < 1):
            raise InputError(f"max_epochs must be null or an integer >= 1, got {max_epochs!r}")
        if int(max_iterations) < 1 or int(batch_size) < 1:
            raise InputError(f"max_iterations and batch_size must be >= 1, got {max_iterations}, {batch_size}")
        self.max_epochs, self.batch_size, self.dataset = max_epochs, int(batch_size), dataset
        self._max_iterations = int(max_iterations)

    @property
    def max_iterations(self) -> int:
        """The optimiser steps ``run`` trains for."""
        if self.max_epochs is None:
            return self._max_iterations
        if self.dataset is None:
            raise InputError("train#trainer#max_epochs needs the trainer's dataset (train#trainer#dataset)")
        world_size = max(1, int(os.environ.get("WORLD_SIZE", "1")))
        return int(self.max_epochs) * max(1, (len(self.dataset) // world_size) // self.batch_size)

    def __repr__(self) -> str:
        return (f"RecipeTrainer(max_epochs={self.max_epochs}, max_iterations={self._max_iterations}, "
                f"batch_size={self.batch_size})")


def latent_diffusion_objective(*, schedule: Mapping[str, Any] | None = None, prediction: str = "epsilon",
                               covariates: Sequence[str] | None = (), conditioning: str = "none",
                               cond_dropout: float = 0.0, coordinates: bool = False,
                               min_snr_gamma: float | None = None) -> DiffusionObjective:
    """The objective of :func:`meddiff3d.pipelines.training.train_latent_diffusion` for these settings: the noise
    ``schedule`` (default: the anchor's), ``prediction``, Min-SNR weighting, conditioning dropout to the null condition
    of ``covariates`` (none when ``conditioning`` is ``"none"``) and the coordinate-channel wrapper."""
    conditional = conditioning != "none"
    return DiffusionObjective(schedule_from_dict(dict(schedule or ANCHOR_SCHEDULE)), prediction,
                              min_snr_gamma=min_snr_gamma, cond_dropout=cond_dropout if conditional else 0.0,
                              null_cond=null_condition(len(covariates or ()) if conditional else 0, conditioning),
                              network_wrapper=coordinate_wrapper(coordinates))


def latent_distillation_objective(*, teacher: str | os.PathLike, start_steps: int = 64, guidance_scale: float = 1.0,
                                  cond_dropout: float | None = None, prediction: str | None = None) -> Any:
    """The objective of the first round of :func:`meddiff3d.pipelines.distillation.distil_latent_diffusion`: a
    ``start_steps / 2``-step student of the ``teacher`` file
    (:class:`~meddiff3d.diffusion.DistillationObjective`, built by the recipe's own
    :func:`~meddiff3d.pipelines.distillation.teacher_objective`)."""
    from meddiff3d.pipelines.distillation import teacher_objective

    return teacher_objective(teacher, start_steps, guidance_scale=guidance_scale, cond_dropout=cond_dropout,
                             prediction=prediction)


def segmentation_objective(*, shape: Sequence[int], schedule: Mapping[str, Any] | None = None,
                           prediction: str = "epsilon") -> Any:
    """The objective of :func:`meddiff3d.pipelines.seg_training.train_segmentation_diffusion`
    (:class:`~meddiff3d.pipelines.seg_training.SegmentationObjective`) on the padded grid ``shape``, which the
    coordinate channels span; ``schedule`` defaults to PatchDDM's."""
    from meddiff3d.pipelines.seg_training import SegmentationObjective

    if prediction not in ("epsilon", "v", "x0"):
        raise InputError(f"prediction must be 'epsilon', 'v' or 'x0' for segmentation diffusion, got {prediction!r}")
    meta = {"coordinates": {"full_shape": [int(s) for s in shape]}, "schedule": dict(schedule or SEGDIFF_SCHEDULE),
            "prediction": prediction}
    return SegmentationObjective(meta)


class NullClass(Mapping):
    """``{"class_labels": the null label}`` of ``classes`` (``None``: the ``datalist`` 's own), read on first use
    (so a config can build the objective before its data exist)."""

    def __init__(self, classes: Sequence[str] | None = None, datalist: Any = None) -> None:
        self.classes, self.datalist = classes, datalist

    def _value(self) -> dict[str, torch.Tensor]:
        names = datalist_classes(self.datalist, self.classes) if self.classes is None else self.classes
        return {"class_labels": class_labels([None], [str(c) for c in names])}

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._value()[key]

    def __iter__(self):
        return iter(("class_labels",))

    def __len__(self) -> int:
        return 1


def image_diffusion_objective(*, schedule: Mapping[str, Any] | None = None, prediction: str = "v",
                              classes: Sequence[str] | None = None, cond_dropout: float = 0.15,
                              min_snr_gamma: float | None = None, datalist: Any = None) -> DiffusionObjective:
    """The objective of :func:`meddiff3d.pipelines.image_training.train_image_diffusion`: the noise ``schedule``
    (default: cosine VP), ``prediction``, Min-SNR weighting and conditioning dropout to the null class of
    ``classes`` (:class:`NullClass`; the class label reaches the network as its ``class_labels`` keyword; batches
    without labels, an unconditional model's, drop nothing). ``classes=[]``: no dropout."""
    unconditional = classes is not None and not list(classes)
    return DiffusionObjective(schedule_from_dict(dict(schedule or IMAGE_SCHEDULE)), prediction,
                              min_snr_gamma=min_snr_gamma, cond_dropout=0.0 if unconditional else cond_dropout,
                              null_cond=NullClass(classes, datalist), keyword_keys=("class_labels",))


# ------------------------------------------------------------------------------------------------ network_def
def autoencoder_network(*, kind: str = "kl", preset: str = "tiny",
                        network: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The autoencoder :func:`~meddiff3d.pipelines.autoencoder_training.train_autoencoder` trains (the codec's
    network)."""
    return build_network(autoencoder_spec(kind, preset, **dict(network or {})))


def latent_diffusion_network(*, codec: str | os.PathLike, covariates: Sequence[str] | None = (),
                             conditioning: str = "none", network: str | Mapping[str, Any] | None = "anchor",
                             overrides: Mapping[str, Any] | None = None, coordinates: bool = False) -> torch.nn.Module:
    """The latent U-Net :func:`~meddiff3d.pipelines.training.train_latent_diffusion` trains on ``codec`` 's latents
    (its channel count is read from the codec file's meta)."""
    from meddiff3d.engine.checkpoint import read_file
    from meddiff3d.pipelines.training import network_spec

    meta = read_file(codec, what="codec file", kind="codec").get("meta") or {}
    channels = (meta.get("latent") or {}).get("channels")
    if channels is None:
        raise InputError(f"codec file {codec} has no latent channel count in its meta (meta.latent.channels)")
    names = list(covariates or ()) if conditioning != "none" else []
    return build_network(network_spec(network, int(channels), names, conditioning, overrides, coordinates=coordinates))


def segmentation_network(*, shape: Sequence[int], network: str = "tiny_cpu",
                         overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The U-Net :func:`~meddiff3d.pipelines.seg_training.train_segmentation_diffusion` trains (coordinates span
    ``shape``)."""
    return build_network(segdiff_unet_spec(network, coordinates=CoordinateChannels(shape), **dict(overrides or {})))


def image_diffusion_network(*, datalist: Any = None, classes: Sequence[str] | None = None, network: str = "tiny_cpu",
                            overrides: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The U-Net :func:`~meddiff3d.pipelines.image_training.train_image_diffusion` trains (one channel; a class
    embedding with ``classes``, by default the ``datalist`` 's own)."""
    names = datalist_classes(datalist, classes) if datalist is not None else [str(c) for c in classes or ()]
    return build_network(image_unet_spec(1, names, network, **dict(overrides or {})))
