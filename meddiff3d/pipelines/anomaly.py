"""Anomaly detection pipeline: calibrate a detector on healthy volumes, then detect on new ones.

The chain, each arrow a plain call::

    datalist / files --(load_datalist: every file read and checked)--> anomaly_transforms (model grid, [0, 1])
      -> heal (meddiff3d.anomaly.healing: latent inpainting | image resample | autoencoder)
      -> residuals -> anomaly_map (z-scored with the calibration) -> to_input_grid (the input file's affine)
      -> OUT/<id>_healed.nii.gz, <id>_anomaly_map.nii.gz, <id>_mask.nii.gz (uint8), <id>_preview.png

:func:`calibrate_anomaly` writes the calibration file (detector settings, thresholds, healthy statistics, model
hashes) next to the weights; :func:`detect_anomalies` needs only the two model files and that calibration. All input
checks (missing files, wrong dimensions, NaNs, corrupt NIfTI, empty sections, models that do not match the
calibration) happen before anything is written.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer

from meddiff3d.anomaly.calibration import (Calibration, anomaly_map, fit_residual_stats, load_calibration, quantile,
                                           residuals, save_calibration, top_mean, volume_score)
from meddiff3d.anomaly.healing import (AnomalyModels, DetectorSettings, brain_mask, heal, healing_steps,
                                       load_anomaly_models, stage_one)
from meddiff3d.checks import safe_name
from meddiff3d.engine.checkpoint import file_sha256
from meddiff3d.errors import InputError
from meddiff3d.pipelines.components import resolve_inputs
from meddiff3d.pipelines.preflight import check_inputs, check_skull_stripped_inputs
from meddiff3d.utils.io import save_json, save_nifti, save_preview_png

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["resolve_inputs", "Detector", "AnomalyEvaluator", "CaseResult", "calibrate_anomaly", "detect_anomalies",
           "write_case",
           "check_calibrated_models", "progress_iter", "progress_steps", "OUTPUT_SUFFIXES"]

#: the files written per case ``<id>`` in the output folder
OUTPUT_SUFFIXES = {"healed": "_healed.nii.gz", "anomaly_map": "_anomaly_map.nii.gz", "mask": "_mask.nii.gz",
                   "preview": "_preview.png"}


# ------------------------------------------------------------------------------------------------ one detector
@dataclass
class CaseResult:
    """One case on the model grid: input ``x``, mean ``healed`` volume, ``score`` map, ``brain`` mask (all
    ``(1, 1, *shape)``), the volume score and the transformed item (for the way back to the input grid)."""

    x: torch.Tensor
    healed: torch.Tensor
    score: torch.Tensor
    brain: torch.Tensor
    volume_score: float
    data: dict
    seconds: float


class Detector(Inferer):
    """Settings + models + calibration (when known) + the input transform, applied one case at a time: the anomaly
    bundle's ``inferer`` (``transform``: its ``preprocessing``; default ``anomaly_transforms`` on the models' grid).

    A MONAI ``Inferer`` whose ``inputs`` is one datalist item (``{"image": path, ...}``: the transform reads it and
    keeps what the way back to the input grid needs) and whose networks are its ``models`` (the codec and the latent
    U-Net, healing in turn); ``network`` is accepted for the interface and must be ``None`` or ``models``."""

    def __init__(self, models: AnomalyModels, settings: DetectorSettings, calibration: Calibration | None = None,
                 transform: Any = None):
        from meddiff3d.data.transforms import anomaly_transforms

        Inferer.__init__(self)
        self.models, self.settings, self.calibration = models, settings, calibration
        self.transform = transform or anomaly_transforms(models.image_spacing, models.image_shape, train=False)

    def load(self, item: Mapping[str, Any]) -> tuple[dict, torch.Tensor]:
        data = self.transform(dict(item))
        image = data["image"]
        return data, image.as_tensor()[None].float().to(self.models.device)

    def residuals(self, x: torch.Tensor, mask_thresholds: Sequence[float] | None,
                  callback: Callable | None = None) -> tuple[torch.Tensor, list]:
        healing = heal(self.models, x, self.settings, mask_thresholds, callback)
        healed = torch.stack(healing["healed"]).mean(0)
        return healed, residuals(x, healing["healed"], self.settings)

    @property
    def steps(self) -> int:
        """Denoiser steps per volume (:func:`~meddiff3d.anomaly.healing.healing_steps`; 0 for the autoencoder)."""
        return healing_steps(self.models, self.settings)

    def __call__(self, inputs: Mapping[str, Any], network: Any = None,  # type: ignore[override]
                 callback: Callable | None = None) -> CaseResult:
        """Score one item; ``callback(i, t, z, z0)`` after every denoiser step of its healing (progress)."""
        if network is not None and network is not self.models:
            raise ValueError("Detector heals with its own models; pass network=None")
        item = inputs
        if self.calibration is None:
            raise RuntimeError("Detector needs a calibration to score volumes")
        start = time.perf_counter()
        data, x = self.load(item)
        healed, maps = self.residuals(x, self.calibration.mask_thresholds, callback)
        score = anomaly_map(x, maps, self.calibration.residual_stats, self.settings)
        brain = brain_mask(x, self.settings.brain_threshold)
        return CaseResult(x, healed, score, brain, volume_score(score, brain, self.settings.top_fraction), data,
                          time.perf_counter() - start)


def progress_iter(items: Sequence, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="volume")


def progress_steps(items: Sequence, desc: str, enabled: bool, steps_per_item: int) -> Iterator[tuple[Any, Any]]:
    """``(item, callback)`` for each of ``items``, with one tqdm bar over every denoiser step of their healing
    (``steps_per_item`` each, :attr:`Detector.steps`; one tick per item when 0); ``callback`` goes to
    :func:`~meddiff3d.anomaly.healing.heal` / ``stage_one`` / :class:`Detector` (``None`` when disabled)."""
    if not enabled:
        for item in items:
            yield item, None
        return
    from tqdm import tqdm

    per_item = max(int(steps_per_item), 0)
    with tqdm(total=len(items) * max(per_item, 1), desc=desc, unit="step" if per_item else "volume") as bar:
        callback = (lambda *_: bar.update()) if per_item else None
        for k, item in enumerate(items):
            bar.set_postfix_str(f"volume {k + 1}/{len(items)}")
            yield item, callback
            if not per_item:
                bar.update()


def _model_entry(path: str | os.PathLike | None) -> dict | None:
    return None if path is None else {"file": Path(path).name, "sha256": file_sha256(path)}


# ------------------------------------------------------------------------------------------------ calibrate
def calibrate_anomaly(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike | None,
                      datalist: str | os.PathLike, out: str | os.PathLike, *, settings: Mapping[str, Any] | None = None,
                      section: str = "validation", target_fpr: float = 0.05, max_volumes: int | None = None,
                      baseline_out: str | os.PathLike | None = None, device: str = "auto", amp: str = "auto",
                      decode_split: int | None = None, source: str | os.PathLike | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Calibrate a detector on the healthy volumes of ``datalist[section]`` and write the calibration file ``out``.

    Args:
        settings: :class:`~meddiff3d.anomaly.healing.DetectorSettings` values (method, start_steps, noise, ...).
        target_fpr: share of healthy brain voxels the voxel threshold may flag (the threshold is the ``1 -
            target_fpr`` quantile of the healthy anomaly maps).
        max_volumes: use at most this many volumes of the section.
        baseline_out: also calibrate the autoencoder baseline (same smoothing, brain mask and FPR) into this file.
        source: what the healthy volumes are as the user gave them (e.g. the folder a temporary datalist was made
            of), recorded as the calibration's ``healthy.datalist`` with no section; default: ``datalist`` itself.

    Returns ``{"calibration": path, "threshold", ..., "baseline": {...}}``.
    """
    settings_obj = DetectorSettings.from_dict(settings)
    if not 0.0 < float(target_fpr) < 1.0:
        raise InputError(f"target_fpr must be in (0, 1), got {target_fpr}")
    items = resolve_inputs(datalist, section)
    if max_volumes is not None:
        items = items[: max(1, int(max_volumes))]
    check_skull_stripped_inputs(items)
    models = load_anomaly_models(codec_path, diffusion_path if settings_obj.uses_diffusion else None, device=device,
                                 amp=amp, decode_split=decode_split)
    runs = [(settings_obj, out, diffusion_path if settings_obj.uses_diffusion else None)]
    if baseline_out is not None:
        baseline = DetectorSettings.from_dict({**settings_obj.to_dict(), "method": "autoencoder"})
        runs.append((baseline, baseline_out, None))
    summary: dict[str, Any] = {}
    for role, (run_settings, run_out, run_diffusion) in zip(("detector", "baseline"), runs):
        detector = Detector(models, run_settings)
        cal = _fit(detector, items, float(target_fpr), progress)
        cal.models = {"codec": _model_entry(codec_path), "diffusion": _model_entry(run_diffusion)}
        cal.healthy.update(datalist=str(Path(source or datalist).absolute()), section=None if source else section)
        save_calibration(cal, run_out)
        result = {"calibration": str(run_out), "method": run_settings.method, "threshold": cal.threshold,
                  "calibration_fpr": cal.calibration_fpr, "volumes": len(items),
                  "volume_threshold": cal.volume_scores["threshold"], "seconds": cal.healthy["seconds"]}
        logger.info("anomaly calibration: %s", result)
        summary[role] = result
    return summary


def _fit(detector: Detector, items: Sequence[Mapping], target_fpr: float, progress: bool) -> Calibration:
    start = time.perf_counter()
    settings, models = detector.settings, detector.models
    loaded = [detector.load(item) for item in items]
    mask_thresholds: list[float] = []
    if settings.uses_diffusion:  # pass 1: what the healthy discrepancies look like, for the heal masks
        per_step: list[list[np.ndarray]] = [[] for _ in settings.start_steps]
        steps = healing_steps(models, settings, "stage_one")
        for (_, x), callback in progress_steps(loaded, "calibration: discrepancies", progress, steps):
            for k, d in enumerate(stage_one(models, x, settings, callback=callback)):
                per_step[k].append(d[d > 0].cpu().numpy())
        mask_thresholds = [quantile(np.concatenate(v), settings.mask_quantile) if sum(map(len, v)) else 0.0
                           for v in per_step]
    per_volume = []  # brain-voxel residuals per volume and step (the map is a per-voxel combination of them)
    for (_, x), callback in progress_steps(loaded, f"calibration: healing ({settings.method})", progress,
                                           detector.steps):
        _, maps = detector.residuals(x, mask_thresholds or None, callback)
        brain = brain_mask(x, settings.brain_threshold) > 0
        per_volume.append([m[brain].cpu().numpy() for m in maps])
    stats = fit_residual_stats(per_volume, settings.step_names)
    scores = [np.mean([(v[k] - s["mean"]) / s["std"] for k, s in enumerate(stats)], axis=0) for v in per_volume]
    volume_scores = [top_mean(s, settings.top_fraction) for s in scores]
    pooled = np.concatenate(scores)
    threshold = quantile(pooled, 1.0 - target_fpr)
    vol = np.asarray(volume_scores, dtype=np.float64)
    cal = Calibration(
        settings=settings, models={}, mask_thresholds=mask_thresholds, residual_stats=stats,
        image={"shape": models.image_shape, "spacing": models.image_spacing,
               "normalisation": "percentile 0-99.5 -> [0, 1] (meddiff3d.data.transforms.anomaly_transforms)"},
        threshold=threshold, target_fpr=target_fpr, calibration_fpr=float((pooled > threshold).mean()),
        volume_scores={"healthy": [round(float(s), 6) for s in vol], "mean": float(vol.mean()),
                       "std": float(vol.std()), "threshold": quantile(vol, 1.0 - target_fpr)},
        healthy={"ids": [str(it.get("id")) for it in items], "brain_voxels": int(pooled.size),
                 "seconds": round(time.perf_counter() - start, 2)},
    )
    return cal


# ------------------------------------------------------------------------------------------------ detect
def check_calibrated_models(calibration: Calibration, codec_path, diffusion_path, source: str) -> None:
    wanted = calibration.models or {}
    for role, path in (("codec", codec_path), ("diffusion", diffusion_path)):
        entry = wanted.get(role)
        if entry is None:
            continue
        if path is None or not Path(path).is_file():
            raise InputError(f"{role} file {path} does not exist (the calibration {source} needs {entry['file']!r})")
        if file_sha256(path) != entry["sha256"]:
            raise InputError(f"{role} file {path} is not the model the calibration {source} was made with "
                             f"(expected {entry['file']!r}, sha256 {entry['sha256'][:12]}...); recalibrate")


def write_case(result: CaseResult, case_id: str, output_dir: Path, calibration: Calibration) -> dict[str, Any]:
    """The four output files of one case, on the input file's grid and affine; returns the case summary."""
    from meddiff3d.data.transforms import to_input_grid

    on_input = to_input_grid({"healed": result.healed[0].cpu(), "anomaly_map": result.score[0].cpu()}, result.data)
    affine = np.asarray(on_input["anomaly_map"].affine, dtype=np.float64)
    score = on_input["anomaly_map"][0].numpy().astype(np.float32)
    mask = (score > calibration.threshold).astype(np.uint8)
    case_id = safe_name("case id", case_id)  # never a path outside output_dir
    paths = {name: output_dir / f"{case_id}{suffix}" for name, suffix in OUTPUT_SUFFIXES.items()}
    save_nifti(on_input["healed"][0].numpy(), affine, paths["healed"], header_extra={"descrip": "meddiff3d healed"})
    save_nifti(score, affine, paths["anomaly_map"], header_extra={"descrip": "meddiff3d anomaly z-score"})
    save_nifti(mask, affine, paths["mask"], dtype=np.uint8, header_extra={"descrip": "meddiff3d anomaly mask"})
    flagged = result.volume_score > float(calibration.volume_scores["threshold"])
    model_grid_mask = (result.score[0, 0] > calibration.threshold).cpu().numpy()
    model_affine = getattr(result.data.get("image"), "affine", None)  # the model grid (RAS, model spacing)
    save_preview_png(result.x[0, 0].cpu().numpy(), paths["preview"], overlay=model_grid_mask,
                     affine=None if model_affine is None else np.asarray(model_affine, dtype=np.float64),
                     legend={1: (f"anomaly z-score > {calibration.threshold:.3g} (voxel threshold)", (0.9, 0.2, 0.15))},
                     title=f"{case_id}: {'ANOMALOUS' if flagged else 'normal'} ({calibration.settings.method})",
                     notes=[f"voxel threshold z > {calibration.threshold:.3g}: {calibration.target_fpr:.1%} of healthy "
                            f"brain voxels exceed it (calibration)",
                            f"volume score {result.volume_score:.3g} vs volume threshold "
                            f"{float(calibration.volume_scores['threshold']):.3g}"])
    return {"id": case_id, **{k: p.name for k, p in paths.items()}, "volume_score": round(result.volume_score, 6),
            "anomalous": bool(flagged), "mask_voxels": int(mask.sum()), "seconds": round(result.seconds, 3)}


class AnomalyEvaluator:
    """A bundle's anomaly ``evaluator``: ``run()`` scores every item of ``dataset`` (``{"id", "image", ...}``) with
    ``inferer`` (a calibrated :class:`Detector`: its ``preprocessing``, healing and z-scoring), writes the four files
    per case (:func:`write_case`) and ``summary.json``; returns the case summaries.

    ``model_paths`` (``{"codec": path, "diffusion": path}``) with ``check_models``: refuse model files other than
    those the calibration was made with (sha256), before anything is written.
    """

    def __init__(self, inferer: Detector, dataset: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike, *,
                 calibration_path: str | os.PathLike | None = None, model_paths: Mapping[str, Any] | None = None,
                 check_models: bool = True, progress: bool = True) -> None:
        if inferer.calibration is None:
            raise InputError("anomaly detection needs a calibrated detector (run configs/calibrate.yaml first)")
        self.inferer, self.dataset, self.output_dir = inferer, dataset, Path(output_dir)
        self.calibration_path, self.progress = calibration_path, progress
        self.model_paths = model_paths if check_models else None

    def run(self) -> list[dict[str, Any]]:
        start = time.perf_counter()
        items = [self.dataset[i] for i in range(len(self.dataset))]
        calibration, settings, models = self.inferer.calibration, self.inferer.settings, self.inferer.models
        source = str(self.calibration_path or "in use")
        if self.model_paths is not None:
            check_calibrated_models(calibration, self.model_paths.get("codec"),
                                    self.model_paths.get("diffusion") if settings.uses_diffusion else None, source)
        if list(models.image_shape) != list(calibration.image["shape"]):
            raise InputError(f"the models work at {models.image_shape}, the calibration {source} at "
                             f"{calibration.image['shape']}")
        check_inputs(items, self.output_dir, models.image_spacing)  # ids, folder, resampled grids: before compute
        check_skull_stripped_inputs(items)  # the input contract (meddiff3d.data.brain_mask)
        cases = []
        for item, callback in progress_steps(items, f"detecting ({settings.method})", self.progress,
                                             self.inferer.steps):
            cases.append(write_case(self.inferer(item, callback=callback), str(item["id"]), self.output_dir,
                                    calibration))
        save_json({"calibration": str(self.calibration_path), "settings": settings.to_dict(),
                   "threshold": calibration.threshold, "volume_threshold": calibration.volume_scores["threshold"],
                   "cases": cases, "seconds": round(time.perf_counter() - start, 2)}, self.output_dir / "summary.json")
        logger.info("anomaly detection: %d case(s) in %.1f s -> %s", len(cases), time.perf_counter() - start,
                    self.output_dir)
        return cases


def detect_anomalies(codec_path: str | os.PathLike, diffusion_path: str | os.PathLike | None,
                     calibration_path: str | os.PathLike, inputs: str | os.PathLike | Sequence[str], output_dir:
                     str | os.PathLike, *, section: str | None = None, device: str = "auto", amp: str = "auto",
                     decode_split: int | None = None, check_models: bool = True,
                     progress: bool = True) -> list[dict[str, Any]]:
    """Detect anomalies in ``inputs`` (a datalist JSON and its ``section``, or image files); writes the four files
    per case (:data:`OUTPUT_SUFFIXES`) and ``summary.json`` into ``output_dir``; returns the case summaries.

    The detector settings and thresholds come from the calibration file only. ``check_models`` refuses model files
    other than those the calibration was made with (sha256). Built from the bundle's components: the models, a
    calibrated :class:`Detector` (the inferer) and :class:`AnomalyEvaluator`, which runs it.
    """
    calibration = load_calibration(calibration_path)
    settings = calibration.settings
    items = resolve_inputs(inputs, section)
    if not settings.uses_diffusion:
        diffusion_path = None
    if check_models:  # before the models are read; the evaluator need not hash the files again
        check_calibrated_models(calibration, codec_path, diffusion_path, str(calibration_path))
    models = load_anomaly_models(codec_path, diffusion_path, device=device, amp=amp, decode_split=decode_split)
    return AnomalyEvaluator(Detector(models, settings, calibration), items, output_dir,
                            calibration_path=calibration_path, check_models=False, progress=progress).run()
