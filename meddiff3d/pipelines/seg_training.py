"""Training the segmentation diffusion model on random patches (PatchDDM): datalist -> patches -> engine -> one file.

``train_segmentation_diffusion(datalist, run_dir, out=...)`` validates the datalist (4 sequences and a label per
item, one grid per item, no NaNs), loads every training volume once (``brats_transforms``: RAS, ``spacing``, z-score,
padded to ``shape``; labels -> WT/TC/ET), then trains on random patches (:class:`~meddiff3d.data.patches.RandPatchd`,
optionally centred on tumour voxels) with the engine (:func:`meddiff3d.engine.train`: EMA, AMP, checkpoints, exact
resume). Each patch carries its corner, so the coordinate channels are those of its true position in the padded
volume. The result ``out`` is the engine's inference export whose meta (:func:`~meddiff3d.models.segdiff.segdiff_meta`)
holds everything inference needs. Re-running on the same ``run_dir`` resumes.

The loss is :class:`~meddiff3d.diffusion.DiffusionObjective` through a small batch adapter,
:class:`SegmentationObjective`: the clean "image" of the diffusion is the region mask in [-1, 1], the MR sequences are
channel conditioning, the patch corner goes to :class:`~meddiff3d.diffusion.AppendCoordinates`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from meddiff3d.checks import check_output_dir
from meddiff3d.data.datalist import load_datalist
from meddiff3d.diffusion import AppendCoordinates, CoordinateChannels, DiffusionObjective, schedule_from_dict
from meddiff3d.engine import build_network, seed_everything, train
from meddiff3d.engine.recipes import publish_inference, trainer_settings, training_summary
from meddiff3d.errors import InputError
from meddiff3d.models.segdiff import BRATS_MODALITIES, SEGDIFF_SCHEDULE, segdiff_meta, segdiff_unet_spec
from meddiff3d.pipelines.preflight import output_file

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["TRAINER_DEFAULTS", "SegmentationObjective", "patch_dataset", "train_segmentation_diffusion"]

#: trainer settings of this recipe unless given (any other DiffusionTrainer keyword keeps the trainer's default)
TRAINER_DEFAULTS = {"batch_size": 1, "max_iterations": 100_000, "lr": 1e-4, "ema_decay": 0.999, "amp": "auto",
                    "grad_clip": 1.0, "device": "auto", "seed": 0, "checkpoint_every": 1000, "log_every": 10,
                    "progress": True}


class SegmentationObjective:
    """``objective(network, batch) -> (B,)`` for batches ``{"image": sequences, "label": WT/TC/ET in {0, 1},
    "patch_offset": (B, 3)}``: the denoising loss of the mask ``2 label - 1`` given the sequences and coordinates."""

    def __init__(self, meta: Mapping[str, Any], generator: torch.Generator | None = None) -> None:
        self.coordinates = CoordinateChannels(meta["coordinates"]["full_shape"])
        self.diffusion = DiffusionObjective(schedule_from_dict(meta["schedule"]), meta["prediction"],
                                            concat_keys=("concat",), generator=generator)

    def __call__(self, network: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        net = functools.partial(AppendCoordinates(network, self.coordinates), patch_offset=batch.get("patch_offset"))
        mask = batch["label"].to(batch["image"].dtype) * 2.0 - 1.0
        return self.diffusion(net, {"image": mask, "concat": batch["image"]})


def patch_dataset(items: Sequence[Mapping[str, Any]], *, spacing: Sequence[float], shape: Sequence[int],
                  patch_size: Sequence[int] | None, foreground_prob: float = 0.5, progress: bool = False):
    """A MONAI ``CacheDataset``: the deterministic BraTS transforms run once per volume (cached), a random patch with
    its corner (``patch_offset``) is cut at every access (``patch_size=None``: whole volumes, no crop).

    Patches come from the global torch RNG (:class:`~meddiff3d.data.patches.RandPatchd`), which the trainer seeds
    with its ``seed`` and restores on resume."""
    from monai.data import CacheDataset
    from monai.transforms import Compose

    from meddiff3d.data.patches import RandPatchd
    from meddiff3d.data.transforms import brats_transforms

    steps = list(brats_transforms(spacing=spacing, shape=shape, train=False).transforms)
    if patch_size is not None:
        steps.append(RandPatchd(["image", "label"], patch_size, label_key="label", foreground_prob=foreground_prob))
    return CacheDataset(list(items), transform=Compose(steps), num_workers=0, progress=progress)


def train_segmentation_diffusion(
    datalist: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike,
    network: str = "tiny_cpu",
    network_overrides: Mapping[str, Any] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (240, 240, 160),
    patch_size: Sequence[int] = (128, 128, 128),
    foreground_prob: float = 0.5,
    schedule: Mapping[str, Any] | None = None,
    prediction: str = "epsilon",
    section: str = "training",
    **trainer: Any,
) -> dict[str, Any]:
    """Train a PatchDDM-style segmentation diffusion model; returns a summary dict.

    Args:
        datalist: datalist JSON (docs/data.md): 4 sequences (t1, t1ce, t2, flair) and a BraTS label per item.
        run_dir: checkpoints, logs; a checkpoint there is resumed.
        out: where the trained model goes (EMA weights + meta), e.g. ``models/model.pt``.
        network: a preset of :data:`~meddiff3d.models.segdiff.SEGDIFF_PRESETS` (``tiny_cpu``, ``patchddm``);
            ``network_overrides`` replace its arguments.
        spacing, shape: the grid every volume is resampled / padded to (RAS, mm); the coordinates span ``shape``.
        patch_size: training patch (each side a multiple of the U-Net's divisor); ``shape`` trains on whole volumes.
        foreground_prob: probability of centring a patch on a tumour voxel.
        schedule: :class:`NoiseSchedule` arguments (default PatchDDM's linear betas, T = 1000).
        prediction: ``"epsilon"``, ``"v"`` or ``"x0"``.
        trainer: settings of :class:`~meddiff3d.engine.DiffusionTrainer` (``batch_size``, ``max_iterations``, ``lr``,
            ``ema_decay``, ``amp``, ``device``, ``seed``, ``checkpoint_every``, ...) over :data:`TRAINER_DEFAULTS`;
            an unknown name is refused.
    """
    start = time.perf_counter()
    settings = trainer_settings(TRAINER_DEFAULTS, trainer, "segmentation diffusion training")
    batch_size, lr, seed, progress = (settings[k] for k in ("batch_size", "lr", "seed", "progress"))
    run_dir, out = check_output_dir(run_dir, "run_dir"), output_file(out, "out")  # before any compute
    if prediction not in ("epsilon", "v", "x0"):
        raise InputError(f"prediction must be 'epsilon', 'v' or 'x0' for segmentation diffusion, got {prediction!r}")
    spec = segdiff_unet_spec(network, coordinates=CoordinateChannels(shape), **dict(network_overrides or {}))
    meta = segdiff_meta(network=spec, shape=shape, spacing=spacing, schedule=schedule or SEGDIFF_SCHEDULE,
                        prediction=prediction, modalities=BRATS_MODALITIES, patch_size=patch_size,
                        foreground_prob=foreground_prob,
                        training={"datalist": str(datalist), "section": section, "batch_size": batch_size, "lr": lr,
                                  "seed": seed, "max_iterations": settings["max_iterations"]})
    items = load_datalist(datalist, section, modalities=len(BRATS_MODALITIES), require_label=True)
    meta["training"]["num_volumes"] = len(items)
    data = patch_dataset(items, spacing=spacing, shape=meta["image"]["shape"], patch_size=meta["patch"]["size"],
                         foreground_prob=foreground_prob, progress=progress)
    seed_everything(seed)  # the initial weights are a function of the seed
    net = build_network(spec)
    result = train(net, SegmentationObjective(meta), data, run_dir=run_dir, meta=meta, **settings)

    publish_inference(result, out)
    return training_summary("segmentation diffusion", result, out, start, num_volumes=len(items),
                            image_shape=meta["image"]["shape"], patch_size=meta["patch"]["size"])
