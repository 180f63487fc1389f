"""Generating 2D images with an image diffusion model (:mod:`meddiff3d.models.image_diffusion`).

``generate_images(model, output_dir, num_samples=...)`` writes, per sample ``S`` (seed ``seed + i``),
``sample_seed{S}.nii.gz`` (float32 in [0, 1], the model's pixel spacing), ``sample_seed{S}.png`` (8-bit) and
``sample_seed{S}.json`` (settings, model hash, timing), and ``samples.png``, all of them side by side.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff3d.checks import check_int, check_memory, check_output_dir
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import class_labels, from_model_range
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.pipelines.components import ImageRequests
from meddiff3d.pipelines.inferers import ImageDiffusionInferer, autocast_dtype
from meddiff3d.utils.io import save_image_nifti, save_image_png, save_json

__all__ = ["ImageGenerationEvaluator", "generate_images"]


class ImageGenerationEvaluator:
    """A bundle's 2D generation ``evaluator``: ``run()`` samples every request of ``dataset`` (``{"seed", "class"}``
    items, :class:`~meddiff3d.pipelines.components.ImageRequests`) with ``inferer`` over ``network``, ``batch_size``
    at a time, and writes each image (module docstring); returns the NIfTI paths.

    Args:
        network: the image diffusion U-Net, on its device (readied for autocast or float32).
        inferer: an :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer` (sampler, steps, guidance).
        model: the loaded model file, for the sidecars' provenance; optional.
    """

    def __init__(self, network: torch.nn.Module, inferer: ImageDiffusionInferer, dataset: Sequence[Mapping[str, Any]],
                 output_dir: Any, *, model: LoadedModel | None = None, batch_size: int = 8,
                 progress: bool = True) -> None:
        self.network, self.inferer, self.dataset, self.model = network, inferer, dataset, model
        self.output_dir = output_dir
        self.batch_size = check_int("batch_size", batch_size, 1, 1024)
        self.progress = progress

    def _batches(self, requests: list[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
        """Consecutive requests of one class, at most ``batch_size`` at a time."""
        batches: list[list[Mapping[str, Any]]] = []
        for request in requests:
            if batches and len(batches[-1]) < self.batch_size and batches[-1][0]["class"] == request["class"]:
                batches[-1].append(request)
            else:
                batches.append([request])
        return batches

    def run(self) -> list[Path]:
        meta = self.inferer.meta
        requests = [self.dataset[i] for i in range(len(self.dataset))]
        classes = meta.get("classes") or []
        for request in requests:  # every request checked before anything is written
            class_labels([request["class"]], classes)
            if request["class"] is None and self.inferer.guidance_scale != 1.0:
                raise InputError("guidance_scale needs a class (class_name) to guide towards")
        check_memory(f"{len(requests)} images", len(requests) * 2 * 4 * int(np.prod(meta["image"]["shape"])))
        out = check_output_dir(self.output_dir)
        device = next(self.network.parameters()).device
        shape, spacing = meta["image"]["shape"], meta["image"]["spacing"]
        provenance = self.model.provenance() if self.model is not None else None
        dtype = autocast_dtype(self.network)
        images, paths = [], []
        with tqdm(total=len(requests) * self.inferer.steps, unit="step", disable=not self.progress,
                  desc=f"generating {len(requests)} image(s) ({self.inferer.sampler}, {self.inferer.steps} steps)"
                  ) as bar:
            for batch in self._batches(requests):
                seeds, name = [int(r["seed"]) for r in batch], batch[0]["class"]
                start = time.perf_counter()
                labels = class_labels([name] * len(seeds), classes) if classes else None
                x = self.inferer(self.inferer.initial_noise(seeds, device), self.network, labels,
                                 generator=seeds[0], callback=lambda *_, n=len(seeds): bar.update(n))
                seconds = (time.perf_counter() - start) / len(seeds)
                for s, image in zip(seeds, from_model_range(x[:, 0].float()).clamp(0, 1).cpu().numpy()):
                    stem = out / f"sample_seed{s}"
                    paths.append(save_image_nifti(image, spacing, stem.with_suffix(".nii.gz")))
                    save_image_png(image, stem.with_suffix(".png"))
                    save_json({"file": paths[-1].name, "seed": s, "class": name, **self.inferer.settings,
                               "model": provenance,
                               "image": {"shape": list(shape), "spacing": list(spacing), "range": [0, 1]},
                               "seconds_per_image": round(seconds, 3), "device": str(device),
                               "amp": str(dtype).replace("torch.", "") if dtype else "float32"},
                              stem.with_suffix(".json"))
                    images.append(image)
        save_image_png(np.stack(images), out / "samples.png")
        return paths


def generate_images(model: Any, output_dir: Any, *, num_samples: int = 4, class_name: str | None = None,
                    guidance_scale: float = 1.0, sampler: str | None = None, steps: int | None = None, seed: int = 0,
                    batch_size: int = 8, device: str = "auto", amp: str = "auto",
                    progress: bool = True) -> list[Path]:
    """Sample ``num_samples`` images (see the module docstring); returns the NIfTI paths.

    ``class_name`` picks a class of a class-conditional model (``None``: unconditional, the null class);
    ``guidance_scale`` is classifier-free guidance towards it. Built from the bundle's components
    (:class:`~meddiff3d.pipelines.components.ImageRequests`,
    :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer`, :class:`ImageGenerationEvaluator`); every
    setting and the model are checked, and the output folder made, before anything is computed.
    """
    requests = ImageRequests(class_name, num_samples, seed)
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "image_diffusion", device=dev, dtype=dtype)
    inferer = ImageDiffusionInferer(loaded.meta, sampler, steps, guidance_scale)
    return ImageGenerationEvaluator(loaded.network, inferer, requests, output_dir, model=loaded,
                                    batch_size=batch_size, progress=progress).run()
