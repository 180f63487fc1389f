"""Training the pixel-space image diffusion model on a 2D datalist: images in memory -> ``DiffusionObjective`` ->
``DiffusionTrainer`` -> one file (:mod:`meddiff3d.models.image_diffusion`).

``load_image_set(datalist, shape)`` reads every image of a section once (:func:`meddiff3d.data.images2d.read_image_2d`),
resamples it to the model's ``shape`` (bilinear with antialiasing) and maps its own 0.5-99.5 percentile window to
[-1, 1]. ``train_image_diffusion(datalist, run_dir, out=...)`` trains on them, optionally conditioned on each item's
``class`` (classifier-free guidance: conditioning dropout to the null class); re-running on the same ``run_dir``
resumes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from meddiff3d.checks import check_memory, check_output_dir, check_sizes
from meddiff3d.data.datalist import load_datalist, read_datalist
from meddiff3d.diffusion import initial_noise, sample, schedule_from_dict
from meddiff3d.engine import build_network, seed_everything, train
from meddiff3d.engine.recipes import publish_inference, trainer_settings, training_summary
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import (build_image_denoiser, class_labels, datalist_classes,
                                              from_model_range, image_diffusion_meta, image_unet_spec, model_input)
from meddiff3d.models.ldm import sampling_meta
from meddiff3d.pipelines.preflight import output_file
from meddiff3d.pipelines.training_components import image_diffusion_objective

__all__ = ["ImageSet", "load_image_set", "train_image_diffusion", "TRAINER_DEFAULTS"]

TRAINER_DEFAULTS = {"batch_size": 16, "max_iterations": 20_000, "lr": 2e-4, "ema_decay": 0.999, "amp": "auto",
                    "grad_clip": 1.0, "device": "auto", "seed": 0, "checkpoint_every": 500, "log_every": 10,
                    "progress": True}


@dataclass
class ImageSet:
    """A section's images in the model range, ``images`` ``(N, 1, H, W)``, their class ``labels`` ``(N,)`` (the null
    class where an item has none; ``None`` without classes), ``ids`` and the pixel ``spacing`` at the model size."""

    images: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]
    spacing: list[float]

    def items(self) -> list[dict[str, torch.Tensor]]:
        if self.labels is None:
            return [{"image": x} for x in self.images]
        return [{"image": x, "class_labels": y} for x, y in zip(self.images, self.labels)]


def load_image_set(datalist: Any, shape: Sequence[int], *, section: str = "training",
                   classes: Sequence[str] = ()) -> ImageSet:
    """Read and scale one section of a 2D datalist (see the module docstring); with ``classes``, every item needs a
    ``class`` among them."""
    shape = check_sizes("image shape", list(shape), ndim=2)
    doc = read_datalist(datalist)
    if doc.get("spatial_dims", 3) != 2:
        raise InputError(f"datalist {datalist}: not a 2D datalist (it needs \"spatial_dims\": 2 at the top)")
    items = load_datalist(datalist, section, modalities=1, check_images="header")
    check_memory(f"{len(items)} images of {shape[0]}x{shape[1]}", len(items) * (shape[0] * shape[1] * 4 + 64))
    images, names, spacing = [], [], None
    for item in items:
        stated = item.get("pixel_spacing_mm") or doc.get("pixel_spacing_mm")  # PNG / JPEG hold none
        image, image_spacing = model_input(item["image"], shape, stated)
        images.append(image)
        spacing = spacing or image_spacing
        if classes:
            if item.get("class") is None:
                raise InputError(f"datalist {datalist}: item {item.get('id')!r} has no 'class' (a class-conditional "
                                 f"model needs one of {', '.join(classes)})")
            names.append(str(item["class"]))
    labels = class_labels(names, classes) if classes else None
    return ImageSet(torch.stack(images).float(), labels, [str(i.get("id")) for i in items], spacing)


def preview_sampler(meta: Mapping[str, Any], steps: int = 20):
    """``ema_network -> (H, W)`` one sample from fixed noise (DDIM ``steps``), in [0, 1], for the trainer's preview."""
    def preview(network: torch.nn.Module) -> torch.Tensor:
        device = next(network.parameters()).device
        noise = initial_noise([0], [1, *meta["image"]["shape"]], device)
        cond = {"class_labels": class_labels([None], meta["classes"]).to(device)} if meta["classes"] else None
        x = sample(build_image_denoiser(network, meta), noise, schedule_from_dict(meta["schedule"]), sampler="ddim",
                   steps=steps, cond=cond)
        return from_model_range(x[0, 0]).clamp(0, 1)

    return preview


def train_image_diffusion(datalist: Any, run_dir: Any, *, out: Any, shape: Sequence[int] = (64, 64),
                          classes: Sequence[str] | None = None, network: str = "tiny_cpu",
                          network_overrides: Mapping[str, Any] | None = None,
                          schedule: Mapping[str, Any] | None = None, prediction: str = "v",
                          cond_dropout: float = 0.15, min_snr_gamma: float | None = None, section: str = "training",
                          sampling: Mapping[str, Any] | None = None, **trainer: Any) -> dict[str, Any]:
    """Train an image diffusion model on ``section`` of a 2D ``datalist``; returns a summary dict.

    Args:
        datalist: a 2D datalist (``"spatial_dims": 2``).
        run_dir: checkpoints, logs, TensorBoard, previews; a checkpoint there is resumed.
        out: where the trained model goes (EMA weights + meta).
        shape: the model's image size ``[H, W]``; images of another size are resampled to it.
        classes: class names (each item's ``class``), in label order; empty: an unconditional model; ``None``: the
            datalist's top-level ``classes`` (:func:`datalist_classes`).
        network: a preset of :data:`~meddiff3d.models.image_diffusion.IMAGE_UNET_PRESETS`; ``network_overrides``
            replace its arguments.
        schedule: the noise schedule's ``to_dict()`` form (default :data:`IMAGE_SCHEDULE`, cosine VP).
        prediction: ``"v"``, ``"epsilon"`` or ``"x0"``.
        cond_dropout: probability of training a labelled image with the null class (guidance).
        sampling: ``{"sampler", "steps"[, "spacing"]}`` saved as the model's own sampling.
        trainer: :class:`~meddiff3d.engine.DiffusionTrainer` settings over :data:`TRAINER_DEFAULTS`.
    """
    start = time.perf_counter()
    settings = trainer_settings(TRAINER_DEFAULTS, trainer, "image diffusion training")
    run_dir, out = check_output_dir(run_dir, "run_dir"), output_file(out, "out")  # before any compute
    classes = datalist_classes(datalist, classes)
    objective = image_diffusion_objective(schedule=schedule, prediction=prediction, classes=classes,
                                          cond_dropout=cond_dropout, min_snr_gamma=min_snr_gamma)
    schedule_obj = objective.schedule
    spec = image_unet_spec(1, classes, network, **dict(network_overrides or {}))  # checked before reading
    sampling = sampling_meta(sampling) if sampling else None
    image_set = load_image_set(datalist, shape, section=section, classes=classes)
    meta = image_diffusion_meta(
        network=spec, schedule=schedule_obj.to_dict(), prediction=prediction, shape=shape, spacing=image_set.spacing,
        classes=classes, sampling=sampling,
        training={"datalist": str(datalist), "section": section, "num_images": len(image_set.ids),
                  "cond_dropout": cond_dropout if classes else 0.0, "min_snr_gamma": min_snr_gamma,
                  **{k: settings[k] for k in ("batch_size", "lr", "seed", "max_iterations")}})
    seed_everything(settings["seed"])  # the initial weights are a function of the seed
    net = build_network(spec)
    if settings.get("preview_every"):
        settings["preview_fn"] = preview_sampler(meta)
    result = train(net, objective, image_set.items(), run_dir=run_dir, meta=meta, **settings)
    publish_inference(result, out)
    return training_summary("image diffusion", result, out, start, num_images=len(image_set.ids),
                            image_shape=list(shape))
