"""Evaluation of a trained 2D image diffusion model (``medical_2d_ddpm``) against its 2D datalist.

:func:`evaluate_image_generation` samples ``samples_per_class`` images of every class of the model (and as many
unconditional ones), reads the training and the held-out (``test``) images with the training's own scaling
(:func:`~meddiff3d.pipelines.image_training.load_image_set`; both then in [0, 1], clipped), and writes
``OUT/evaluation.json`` and ``OUT/samples.png`` (one row per class):

1. **Class fidelity** -- a nearest-centroid classifier on the images average-pooled to 16x16 and z-scored, fitted on
   the training images of each class: its accuracy on the held-out real images (the ceiling: how far the classes
   are apart in this view), on the samples of each requested class, and chance ``1 / K``.
2. **Realism** -- per class, the foreground share (pixels above 0.1) and the mean foreground intensity of samples
   and of held-out real images (mean, sd); the 1-Wasserstein distance between the foreground intensity
   distributions of all samples and the held-out images, with training vs held-out as the floor.
3. **Diversity** -- mean MS-SSIM (:mod:`.similarity`, 2D) over pairs within a class: samples, and held-out real
   images as the reference (collapse shows as sample MS-SSIM far above the real one).
4. **Memorisation** -- each sample's nearest training image by Pearson correlation (:func:`~.similarity.nn_vector`);
   the threshold is the largest nearest-training correlation of a held-out real image; samples above it are
   flagged as near-copies.
5. **Time** -- seconds per image of sampling (the model's own sampler unless given), device and precision.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from meddiff3d.checks import check_int, check_output_dir
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.models.image_diffusion import class_labels, from_model_range
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.image_training import load_image_set
from meddiff3d.pipelines.inferers import ImageDiffusionInferer, autocast_dtype
from meddiff3d.utils.io import save_image_png, save_json

from .similarity import ms_ssim, ms_ssim_config, nearest_neighbours, nn_vector, pair_indices

__all__ = ["evaluate_image_generation", "FOREGROUND", "CLASSIFIER_SIDE"]

#: pixels above this (in [0, 1]) are foreground (the brain of an MRI slice, the body of a radiograph)
FOREGROUND = 0.1
#: side of the pooled images the nearest-centroid classifier sees
CLASSIFIER_SIDE = 16


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4), "n": int(v.size)}


def _describe(images: np.ndarray) -> dict[str, Any]:
    foreground = [float((x > FOREGROUND).mean()) for x in images]
    intensity = [float(x[x > FOREGROUND].mean()) if (x > FOREGROUND).any() else 0.0 for x in images]
    return {"foreground_share": _stats(foreground), "foreground_intensity": _stats(intensity)}


def _wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """1-Wasserstein distance between the foreground intensities of two image sets (quantile functions)."""
    qa, qb = (np.quantile(x[x > FOREGROUND], np.linspace(0, 1, 201)) for x in (a, b))
    return round(float(np.abs(qa - qb).mean()), 4)


def _within_class_ms_ssim(images: np.ndarray, groups: Sequence[Any], config: dict, max_pairs: int) -> float:
    pairs = pair_indices(list(groups), max_pairs, within=True)
    if not pairs:
        return float("nan")
    return round(float(np.mean([ms_ssim(images[i], images[j], config) for i, j in pairs])), 4)


def _sample(network: torch.nn.Module, inferer: ImageDiffusionInferer, name: str | None, n: int, seed: int,
            batch_size: int, classes: list[str]) -> tuple[np.ndarray, float]:
    device = next(network.parameters()).device
    out, start = [], time.perf_counter()
    for first in range(0, n, batch_size):
        seeds = list(range(seed + first, seed + min(first + batch_size, n)))
        labels = class_labels([name] * len(seeds), classes) if classes else None
        x = inferer(inferer.initial_noise(seeds, device), network, labels, generator=seeds[0])
        out.append(from_model_range(x[:, 0].float()).clamp(0, 1).cpu().numpy())
    return np.concatenate(out), (time.perf_counter() - start) / n


def evaluate_image_generation(model: Any, datalist: Any, output_dir: Any, *, samples_per_class: int = 32,
                              sampler: str | None = None, steps: int | None = None, seed: int = 0,
                              batch_size: int = 16, max_pairs: int = 200, device: str = "auto",
                              amp: str = "auto") -> dict[str, Any]:
    """The evaluation of the module docstring; returns what ``OUT/evaluation.json`` holds."""
    samples_per_class = check_int("samples_per_class", samples_per_class, 2, 10_000)
    dev = resolve_device(device)
    loaded = load_model(model, "image_diffusion", device=dev, dtype=resolve_precision(amp, dev, "inference").dtype)
    meta, classes = loaded.meta, list(loaded.meta.get("classes") or [])
    inferer = ImageDiffusionInferer(meta, sampler, steps)
    shape = meta["image"]["shape"]
    sets = {s: load_image_set(datalist, shape, section=s, classes=classes) for s in ("training", "test")}
    out = check_output_dir(output_dir)
    real = {s: from_model_range(v.images[:, 0]).clamp(0, 1).numpy() for s, v in sets.items()}
    names = {s: ([classes[int(i)] for i in v.labels] if classes else [None] * len(v.ids)) for s, v in sets.items()}

    generated, seconds = {}, []
    for name in [*classes, None]:
        images, per_image = _sample(loaded.network, inferer, name, samples_per_class, seed, batch_size, classes)
        generated[name] = images
        seconds.append(per_image)
    def pooled(images: np.ndarray) -> np.ndarray:
        return np.stack([nn_vector(x, dims=2, max_side=CLASSIFIER_SIDE) for x in images])

    features = {s: pooled(v) for s, v in real.items()}
    result: dict[str, Any] = {"model": loaded.provenance(), "datalist": str(datalist), **inferer.settings,
                              "samples_per_class": samples_per_class, "classes": classes,
                              "real": {s: len(v) for s, v in real.items()}}
    if classes:
        centroids = np.stack([features["training"][np.asarray(names["training"]) == c].mean(0) for c in classes])

        def predict(vectors: np.ndarray) -> np.ndarray:
            return np.asarray(classes)[np.argmin(((vectors[:, None] - centroids[None]) ** 2).sum(-1), 1)]

        test_acc = float((predict(features["test"]) == np.asarray(names["test"])).mean())
        per_class = {c: round(float((predict(pooled(generated[c])) == c).mean()), 4) for c in classes}
        result["class_fidelity"] = {"held_out_real_accuracy": round(test_acc, 4), "generated_accuracy": per_class,
                                    "generated_accuracy_mean": round(float(np.mean(list(per_class.values()))), 4),
                                    "chance": round(1 / len(classes), 4)}
    all_samples = np.concatenate(list(generated.values()))
    result["realism"] = {
        "generated": {str(k): _describe(v) for k, v in generated.items()},
        "held_out_real": {str(c): _describe(real["test"][np.asarray(names["test"]) == c]) for c in
                          (classes or [None])},
        "foreground_intensity_w1": {"generated_vs_held_out": _wasserstein(all_samples, real["test"]),
                                    "training_vs_held_out": _wasserstein(real["training"], real["test"])}}
    config = ms_ssim_config(shape)
    result["diversity_ms_ssim_within_class"] = {
        "generated": _within_class_ms_ssim(np.concatenate([generated[c] for c in classes or [None]]),
                                           [c for c in classes or [None] for _ in range(samples_per_class)],
                                           config, max_pairs),
        "held_out_real": _within_class_ms_ssim(real["test"], names["test"], config, max_pairs), "config": config}
    train_vectors = np.stack([nn_vector(x, dims=2) for x in real["training"]])
    _, held_out_nn = nearest_neighbours(np.stack([nn_vector(x, dims=2) for x in real["test"]]), train_vectors)
    _, sample_nn = nearest_neighbours(np.stack([nn_vector(x, dims=2) for x in all_samples]), train_vectors)
    threshold = float(held_out_nn.max())
    result["memorisation"] = {"threshold_held_out_max": round(threshold, 4),
                              "nearest_training_r": _stats(sample_nn),
                              "held_out_nearest_training_r": _stats(held_out_nn),
                              "flagged": int((sample_nn > threshold).sum()), "of": int(len(sample_nn))}
    dtype = autocast_dtype(loaded.network)
    result["time"] = {"seconds_per_image": round(float(np.mean(seconds)), 4), "device": str(dev),
                      "amp": str(dtype).replace("torch.", "") if dtype else "float32"}
    rows = [generated[c][:8] for c in [*classes, None]]
    save_image_png(np.concatenate(rows), out / "samples.png", columns=min(8, samples_per_class))
    save_json(result, out / "evaluation.json")
    return result
