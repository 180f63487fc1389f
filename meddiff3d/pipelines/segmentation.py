"""Segmentation by conditional diffusion: an ensemble of sampled tumour masks per case -> label map, probabilities and
uncertainty on the input grid (Wolleb et al. 2022 implicit ensembles; PatchDDM whole-volume or sliding-window runs).

Per case, as a chain of plain calls::

    brats_transforms(train=False)  -> sequences (4, *shape) on the model grid (RAS, model spacing, z-scored, padded)
    conditioned_network(net, meta[, roi_size]) -> make_denoiser(schedule, prediction) -> clamp x0 to [-1, 1]
    SAMPLERS[sampler](denoiser, noise (N, 3, *shape), timesteps, schedule, cond={"image": sequences})
    -> ensemble_statistics (probability, variance, entropy per region) -> to_input_grid -> regions_to_labels -> files

Sample ``i`` of a case starts from noise drawn with seed ``seed + i`` (on the CPU, so a seed gives the same sample on
every device); the N samples are denoised together in batches of ``batch_size``.

Output contract (for case ``<id>`` under ``output_dir`` ``OUT``; every file written atomically, all on the input
file's grid with its affine)::

    OUT/<id>/<id>_seg.nii.gz        uint8 BraTS labels 0/1/2/4 (derived from the nested WT/TC/ET decisions)
    OUT/<id>/<id>_prob.nii.gz       float32 vectors (X, Y, Z, 1, 3): ensemble vote share per region WT, TC, ET
    OUT/<id>/<id>_variance.nii.gz   float32 vectors (X, Y, Z, 1, 3): variance of the samples' soft masks
    OUT/<id>/<id>_entropy.nii.gz    float32 vectors (X, Y, Z, 1, 3): binary entropy (nats) of the vote share
    OUT/<id>/<id>_preview.png       FLAIR centre slices (radiological view) with the label map coloured per label
    OUT/<id>/<id>_segdiff.json      settings, model hash, seconds, tumour volumes, mean entropy per region (nats)

The three maps are NIfTI vector images (``dim[5] = 3``, intent VECTOR, ``intent_name`` "WT,TC,ET";
:func:`meddiff3d.utils.io.save_vector_nifti`), not 4D files whose 4th axis readers take for time: ITK, SimpleITK
and 3D Slicer read a 3D image of 3-component pixels; :func:`meddiff3d.utils.io.read_channels` gives ``(X, Y, Z, 3)``.

Each sample's final denoised mask ``x0`` votes for a region where it is above 0 (the midpoint of the model's
``mask_range`` [-1, 1]); the probability is the share of votes (with N = 1: the sample's own 0/1 segmentation), the
variance that of the soft masks ``clip((x0 + 1) / 2, 0, 1)`` (0 with N = 1).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meddiff3d.checks import check_number, check_output_dir, safe_name
from meddiff3d.data.brats import BRATS_REGIONS, region_masks, regions_to_labels
from meddiff3d.data.transforms import brats_transforms
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.models.segdiff import ensemble_statistics
from meddiff3d.pipelines.components import DatalistDataset, segmentation_postprocessing
from meddiff3d.pipelines.inferers import ClampedDenoiser, DiffusionSegmentationInferer, autocast_dtype, sample_masks
from meddiff3d.pipelines.preflight import check_inputs, check_segmentation_job
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png, save_vector_nifti

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["ClampedDenoiser", "ensemble_statistics", "sample_masks", "segment", "SegmentationEvaluator",
           "output_paths", "write_case"]

#: label convention of the written label maps (0/1/2/4)
LABEL_CONVENTION = "brats2021"
#: preview colours of the written labels (those of the Slicer segments, meddiff3d.label.slicer_io.BRATS_SEGMENTS)
LABEL_LEGEND = {1: ("NCR necrotic core (label 1)", (0.85, 0.35, 0.25)), 2: ("ED oedema (2)", (0.35, 0.75, 0.35)),
                4: ("ET enhancing tumour (4)", (0.95, 0.85, 0.2))}
FLAIR_CHANNEL = 3


def output_paths(output_dir: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """The files written for ``case_id`` (the output contract of the module docstring)."""
    case_id = safe_name("case id", case_id)  # never a path outside output_dir
    folder = Path(output_dir) / case_id
    names = {"seg": "seg.nii.gz", "prob": "prob.nii.gz", "variance": "variance.nii.gz", "entropy": "entropy.nii.gz",
             "preview": "preview.png", "info": "segdiff.json"}
    return {key: folder / f"{case_id}_{name}" for key, name in names.items()}


class SegmentationEvaluator:
    """A bundle's segmentation ``evaluator``: ``run()`` segments every case of ``dataset`` (transformed items
    ``{"id", "image"}``, the sequences on the model grid) with ``inferer`` (the ensemble) over ``network``, maps the
    ensemble statistics back onto each input grid with ``postprocessing`` and writes the case (:func:`write_case`);
    returns the case folders.

    Args:
        network: the segmentation U-Net on its device.
        inferer: a :class:`~meddiff3d.pipelines.inferers.DiffusionSegmentationInferer`.
        dataset: e.g. :class:`~meddiff3d.pipelines.components.DatalistDataset` with ``brats_transforms(train=False)``;
            its length is taken first, so every image is read and checked before anything is written.
        postprocessing: ``{"pred": samples, "image": sequences}`` -> ``prob``, ``variance``, ``entropy``, ``flair``
            on the input grid (:func:`~meddiff3d.pipelines.components.segmentation_postprocessing`).
        threshold: probability above which a voxel belongs to a region.
        model: the loaded model file, for the sidecars' provenance.
    """

    def __init__(self, network: torch.nn.Module, inferer: DiffusionSegmentationInferer, dataset: Any,
                 postprocessing: Callable[[dict], dict], output_dir: str | os.PathLike, *, threshold: float = 0.5,
                 model: LoadedModel | None = None, progress: bool = True) -> None:
        self.network, self.inferer, self.dataset, self.postprocessing = network, inferer, dataset, postprocessing
        self.output_dir, self.model, self.progress = Path(output_dir), model, progress
        self.threshold = check_number("threshold", threshold, 0.0, 1.0, open_low=True, open_high=True)

    def run(self) -> list[Path]:
        start = time.perf_counter()
        cases = len(self.dataset)  # every image read and checked
        items = getattr(self.dataset, "items", None)  # a DatalistDataset's; a dataset swapped in may have none
        if items is None:
            check_output_dir(self.output_dir)
        else:
            voxels = check_inputs(items, self.output_dir, self.inferer.meta["image"]["spacing"])
            inferer = self.inferer
            check_segmentation_job(inferer.num_samples, inferer.batch_size, inferer.roi_size, inferer.meta,
                                   max(voxels, default=0))
        dev, dtype = next(self.network.parameters()).device, autocast_dtype(self.network)
        settings = {"model": self.model.provenance() if self.model is not None else None, **self.inferer.settings,
                    "threshold": self.threshold, "regions": list(BRATS_REGIONS),
                    "amp": str(dtype).replace("torch.", "") if dtype else "float32", "device": str(dev)}
        written = []
        # one tick per sample and denoising step (a case is N x steps of them), not one per case
        with tqdm(total=cases * self.inferer.num_samples * self.inferer.steps, unit="step", disable=not self.progress,
                  desc=f"segmenting {cases} case(s) (N={self.inferer.num_samples}, {self.inferer.sampler} "
                       f"{self.inferer.steps} steps)") as bar:
            for index in range(cases):
                item = self.dataset[index]
                bar.set_postfix_str(f"case {item['id']} ({index + 1}/{cases})")
                t0 = time.perf_counter()
                samples = self.inferer(item["image"].as_tensor()[None].to(dev), self.network,
                                       callback=lambda i, t, x, x0: bar.update(x.shape[0]))
                seconds = time.perf_counter() - t0
                maps = self.postprocessing({"pred": samples.cpu(), "image": item["image"]})
                written.append(write_case(item["id"], maps, self.output_dir, self.threshold,
                                          {**settings, "seconds_sampling": round(seconds, 3)}))
        logger.info("segmented %d case(s) in %.1f s -> %s", len(written), time.perf_counter() - start,
                    self.output_dir)
        return written


def segment(
    model_path: str | os.PathLike,
    datalist: str | os.PathLike,
    *,
    section: str | None = None,
    output_dir: str | os.PathLike = "outputs",
    num_samples: int = 5,
    sampler: str = "ddim",
    steps: int = 20,
    batch_size: int | None = None,
    roi_size: Sequence[int] | int | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    threshold: float = 0.5,
    seed: int = 0,
    device: str | torch.device = "auto",
    amp: str = "auto",
    progress: bool = True,
) -> list[Path]:
    """Segment every case of a datalist section; returns the case folders (contents: see module docstring).

    Args:
        model_path: a segmentation diffusion model file (``train_segmentation_diffusion``'s ``out``).
        datalist: datalist JSON whose items have the 4 sequences (t1, t1ce, t2, flair); labels are not needed.
        section: ``training``, ``validation`` or ``test``; ``None``: every section that has items.
        num_samples: ensemble size N; sample ``i`` uses seed ``seed + i``.
        sampler, steps: a sampler of :data:`meddiff3d.diffusion.SAMPLERS` (``ddim`` or ``dpmpp_2m`` recommended) and
            its number of denoiser evaluations.
        batch_size: samples denoised together (default: all N at once).
        roi_size: ``None`` runs the network on the whole volume in one pass; a window size runs it window by window
            (MONAI sliding window, ``overlap``, Gaussian blending, ``sw_batch_size`` windows at a time).
        threshold: probability above which a voxel belongs to a region.
        device, amp: as in generation (``amp="auto"``: bf16 on CPUs with native bf16 and on GPUs).

    The bundle's components, built from the model file: ``network`` (the U-Net), ``preprocessing``
    (:func:`~meddiff3d.data.transforms.brats_transforms`), ``dataset``
    (:class:`~meddiff3d.pipelines.components.DatalistDataset`),
    :class:`~meddiff3d.pipelines.inferers.DiffusionSegmentationInferer`, ``postprocessing``
    (:func:`~meddiff3d.pipelines.components.segmentation_postprocessing`) and :class:`SegmentationEvaluator`, which
    runs them. The request, the model and every image of the section (4 sequences, one grid, no NaN) are checked
    before anything is written; an :class:`InputError` names the bad value or file.
    """
    check_number("threshold", threshold, 0.0, 1.0, open_low=True, open_high=True)  # before the model is read
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    model = load_model(model_path, "segmentation_diffusion", device=dev, dtype=dtype)  # bf16, channels-last: ~17 %
    meta = model.meta                                                                   # faster on CPU
    inferer = DiffusionSegmentationInferer(meta, num_samples, sampler, steps, seed, batch_size, roi_size,
                                           float(overlap), sw_batch_size)
    transform = brats_transforms(spacing=meta["image"]["spacing"], shape=meta["image"]["shape"], train=False,
                                 regions=False)
    dataset = DatalistDataset(datalist, section, transform, modalities=len(meta["modalities"]), keys=["id", "image"])
    postprocessing = segmentation_postprocessing(mask_range=meta["mask_range"])
    return SegmentationEvaluator(model.network, inferer, dataset, postprocessing, output_dir, threshold=threshold,
                                 model=model, progress=progress).run()

def write_case(case_id: str, maps: Mapping[str, Any], output_dir: str | os.PathLike, threshold: float,
               info: Mapping[str, Any]) -> Path:
    """Write one case's files (module docstring); ``maps`` are MetaTensors ``(C, *input_shape)`` on the input grid."""
    paths = output_paths(output_dir, case_id)
    affine = np.asarray(maps["prob"].affine, dtype=np.float64)
    channels = {k: np.asarray(maps[k], dtype=np.float32) for k in ("prob", "variance", "entropy")}
    label = regions_to_labels(channels["prob"], LABEL_CONVENTION, threshold)
    for key, array in channels.items():
        save_vector_nifti(array, affine, paths[key], names=BRATS_REGIONS,
                          descrip=f"meddiff3d segdiff {key} per region WT,TC,ET")
    save_nifti(label, affine, paths["seg"], dtype=np.uint8, header_extra={"descrip": "meddiff3d segdiff BraTS labels"})
    save_preview_png(np.asarray(maps["flair"][0], dtype=np.float32), paths["preview"], overlay=label, affine=affine,
                     legend=LABEL_LEGEND, title=f"{case_id}: FLAIR with the BraTS label map",
                     notes=[f"region probability > {threshold:g}: WT = NCR + ED + ET, TC = NCR + ET "
                            f"(N = {info.get('num_samples', '?')} samples)"])
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(0))
    volumes = {region: round(float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0, 3)
               for region, mask in region_masks(label, LABEL_CONVENTION).items()}
    mean_entropy = {region: round(float(channels["entropy"][i].mean()), 5) for i, region in enumerate(BRATS_REGIONS)}
    save_json({"id": case_id, "files": {k: p.name for k, p in paths.items() if k != "info"}, **info,
               "tumour_volumes_ml": volumes, "mean_entropy_nats": mean_entropy,
               "shape": list(label.shape), "affine": affine.tolist()}, paths["info"])
    return paths["seg"].parent

