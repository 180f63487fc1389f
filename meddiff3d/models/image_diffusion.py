"""The pixel-space image diffusion model (2D; the same U-Net in 3D): its network, its optional class condition, and
what its file holds.

A ``DiffusionModelUNet`` denoises images scaled to [-1, 1] (:data:`MODEL_RANGE`; each training image's 0.5th-99.5th
percentile window mapped to [0, 1] first: :func:`meddiff3d.data.images2d` images come from any scanner and bit depth,
and a window of the image's own values is what survives that). An optional class label (e.g. the finding of a chest
radiograph, or the slice level of a brain MRI) reaches it through MONAI's class embedding (``num_class_embeds``):
labels ``0 .. K-1`` are the classes, ``K`` the null class of classifier-free guidance (conditioning dropout in
training, the unconditional branch in sampling).

File of a trained model (the engine's inference export, read with ``weights_only=True``)::

    {"format": "meddiff3d.inference/1", "iteration": int, "ema": state_dict,
     "meta": {"kind": "meddiff3d.image_diffusion/1",
              "network": {"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}},
              "schedule": NoiseSchedule.to_dict(), "prediction": "v",
              "classes": [names, in label order] (empty: unconditional),
              "image": {"shape": [H, W], "spacing": [mm, mm], "intensity": {"window_percentiles": [0.5, 99.5],
                        "range": [-1, 1]}},
              "sampling": {"sampler", "steps", "spacing"}, "training": {...}}}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai.transforms import Compose, MapTransform

from meddiff3d.checks import check_sizes
from meddiff3d.data.datalist import read_datalist
from meddiff3d.data.images2d import read_image_2d, resample
from meddiff3d.diffusion import ClassifierFreeGuidance, make_denoiser, schedule_from_dict
from meddiff3d.engine.checkpoint import kind_tag
from meddiff3d.engine.precision import Autocast
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import sampling_meta

__all__ = ["IMAGE_UNET_PRESETS", "IMAGE_SCHEDULE", "MODEL_RANGE", "WINDOW_PERCENTILES", "image_unet_spec",
           "image_diffusion_meta", "datalist_classes", "class_labels", "window", "to_model_range", "from_model_range",
           "build_image_denoiser", "model_input", "ModelInputd", "image_diffusion_transforms"]

#: the default noise schedule: cosine VP (Nichol & Dhariwal 2021), T = 1000
IMAGE_SCHEDULE = {"schedule": "cosine", "num_train_timesteps": 1000}
#: the intensity range the network sees
MODEL_RANGE = (-1.0, 1.0)
#: the window of each image's own values mapped to [0, 1] before training and before data consistency
WINDOW_PERCENTILES = (0.5, 99.5)

IMAGE_UNET_PRESETS: dict[str, dict[str, Any]] = {
    # 64x64 or 128x128 images on a CPU: 4 levels, attention at the two coarsest
    "demo": {"channels": [32, 64, 128, 128], "attention_levels": [False, False, True, True], "num_res_blocks": 1,
             "num_head_channels": 32, "norm_num_groups": 16},
    "tiny_cpu": {"channels": [16, 32, 32], "attention_levels": [False, False, True], "num_res_blocks": 1,
                 "num_head_channels": 16, "norm_num_groups": 8},
    "test": {"channels": [8, 16], "attention_levels": [False, False], "num_res_blocks": 1, "norm_num_groups": 8},
}  # fmt: skip


def image_unet_spec(channels: int = 1, classes: Sequence[str] = (), preset: str = "tiny_cpu", *,
                    spatial_dims: int = 2, **overrides: Any) -> dict[str, Any]:
    """``{"class": "monai.networks.nets.DiffusionModelUNet", "args": {...}}`` for images of ``channels`` channels;
    with ``classes``, a class embedding of ``len(classes) + 1`` entries (the last: the null class)."""
    if preset not in IMAGE_UNET_PRESETS:
        raise InputError(f"unknown image U-Net preset {preset!r}; valid: {', '.join(IMAGE_UNET_PRESETS)}")
    if spatial_dims not in (2, 3):
        raise InputError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    args: dict[str, Any] = {"spatial_dims": spatial_dims, "in_channels": int(channels), "out_channels": int(channels),
                            **IMAGE_UNET_PRESETS[preset]}
    if classes:
        args["num_class_embeds"] = len(classes) + 1
    args.update(overrides)
    return {"class": "monai.networks.nets.DiffusionModelUNet", "args": args}


def image_diffusion_meta(*, network: Mapping[str, Any], schedule: Mapping[str, Any], prediction: str,
                         shape: Sequence[int], spacing: Sequence[float], classes: Sequence[str] = (),
                         training: Mapping[str, Any] | None = None,
                         sampling: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The meta saved with an image diffusion model (layout in the module docstring)."""
    if len(shape) != len(spacing):
        raise InputError(f"image shape {list(shape)} and spacing {list(spacing)} differ in length")
    return {
        "kind": kind_tag("image_diffusion"),
        "network": dict(network),
        "schedule": dict(schedule),
        "prediction": prediction,
        "classes": [str(c) for c in classes],
        "image": {"shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing],
                  "intensity": {"window_percentiles": list(WINDOW_PERCENTILES), "range": list(MODEL_RANGE)}},
        "training": dict(training or {}),
        **({"sampling": sampling_meta(sampling)} if sampling else {}),
    }


def datalist_classes(datalist: Any, classes: Sequence[str] | None = None) -> list[str]:
    """``classes`` as names; ``None``: the 2D datalist's own top-level ``classes`` (none: an unconditional model)."""
    if classes is None:
        classes = read_datalist(datalist).get("classes") or []
        if not isinstance(classes, list):
            raise InputError(f"datalist {datalist}: 'classes' must be a list of names, got {classes!r}")
    return [str(c) for c in classes]


def class_labels(names: Sequence[str | None], classes: Sequence[str]) -> torch.Tensor:
    """Class names (``None``: unconditional) -> the long labels the network takes (the null class ``len(classes)``)."""
    labels = []
    for name in names:
        if name is None:
            labels.append(len(classes))
        elif name in classes:
            labels.append(list(classes).index(name))
        else:
            known = ", ".join(classes) if classes else "none: the model is unconditional"
            raise InputError(f"unknown class {name!r}; this model knows {known}")
    return torch.tensor(labels, dtype=torch.long)


def window(image: np.ndarray | torch.Tensor, percentiles: Sequence[float] = WINDOW_PERCENTILES):
    """``(low, high)``: the image's own percentile window (over all its pixels)."""
    values = image.detach().float().cpu().numpy() if torch.is_tensor(image) else np.asarray(image, np.float32)
    low, high = (float(v) for v in np.percentile(values, list(percentiles)))
    return low, (high if high > low else low + 1.0)


def to_model_range(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``image`` with its window ``[low, high]`` mapped to :data:`MODEL_RANGE` (values outside kept, not clipped)."""
    return (image - low) / (high - low) * (MODEL_RANGE[1] - MODEL_RANGE[0]) + MODEL_RANGE[0]


def from_model_range(x: torch.Tensor, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    """The inverse of :func:`to_model_range` (default: to [0, 1])."""
    return (x - MODEL_RANGE[0]) / (MODEL_RANGE[1] - MODEL_RANGE[0]) * (high - low) + low


#: formats that store no pixel spacing: a datalist's ``pixel_spacing_mm`` gives theirs
SPACING_FREE_FORMATS = ("png", "jpeg")


def model_input(path: Any, shape: Sequence[int], stated_spacing: Sequence[float] | None = None
                ) -> tuple[torch.Tensor, list[float]]:
    """The image in ``path`` as the network is trained on it: ``(1, H, W)`` float32, its own :func:`window` mapped to
    [0, 1] then to :data:`MODEL_RANGE` (:func:`to_model_range`), resampled to ``shape`` (bilinear, antialiased); and
    its pixel spacing at that size (a PNG's or JPEG's from ``stated_spacing``, the datalist's, else 1 mm)."""
    image = read_image_2d(path)
    low, high = window(image.array)
    tensor = to_model_range(torch.from_numpy(image.array)[None, None], low, high)
    native = image.spacing
    if stated_spacing is not None and image.format in SPACING_FREE_FORMATS:
        native = [float(s) for s in stated_spacing]
    spacing = [s * n / m for s, n, m in zip(native, image.shape, shape)]
    return resample(tensor, shape)[0].float(), spacing


class ModelInputd(MapTransform):
    """``data[key]``: a 2D image file -> the network's input of :func:`model_input` (``(1, H, W)``)."""

    def __init__(self, keys: Any = "image", shape: Sequence[int] = (64, 64)) -> None:
        super().__init__(keys)
        self.shape = check_sizes("image shape", list(shape), ndim=2)

    def __call__(self, data: Mapping[Any, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = model_input(out[key], self.shape)[0]
        return out


def image_diffusion_transforms(shape: Sequence[int] = (64, 64)) -> Compose:
    """A bundle's ``train#preprocessing``: what the training reads of each item (:class:`ModelInputd`)."""
    return Compose([ModelInputd("image", shape)])


def build_image_denoiser(network: Callable[..., torch.Tensor], meta: Mapping[str, Any], *,
                         guidance_scale: float = 1.0, amp_dtype: torch.dtype | None = None):
    """The denoiser ``(x, t, class_labels=...) -> x0`` the samplers call::

        network -> Autocast(amp_dtype) -> make_denoiser(schedule, prediction) -> [ClassifierFreeGuidance]

    Guidance (``guidance_scale != 1``) needs a class-conditional model; its unconditional branch is the null class.
    """
    classes = meta.get("classes") or []
    if guidance_scale != 1.0 and not classes:
        raise InputError("guidance_scale needs a class-conditional model; this one has no classes")
    denoiser = make_denoiser(Autocast(network, amp_dtype), schedule_from_dict(meta["schedule"]), meta["prediction"])
    if guidance_scale != 1.0:
        denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, {"class_labels": class_labels([None], classes)})
    return denoiser
