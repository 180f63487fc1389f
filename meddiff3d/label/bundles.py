"""The three bundles as served models: read a bundle's own configs, call its own pipeline, write Slicer-ready files.

A served bundle is a folder (or symlink) ``<app>/model/<name>``. Its kind is the ``evaluator`` its
``configs/inference.yaml`` runs (``SegmentationEvaluator`` / ``AnomalyEvaluator`` / ``GenerationEvaluator``), so a
renamed copy works too.
Model file paths, device and amp come from the bundle's ``configs/common.yaml`` + ``configs/inference.yaml`` (plus
``configs/label.yaml`` when the bundle has one, e.g. to point at other weights), parsed with ``bundle_root`` = the
folder, exactly as ``python -m monai.bundle run`` would.

Each ``run_*`` function is the one call into a pipeline (:func:`meddiff3d.pipelines.segmentation.segment`,
:func:`meddiff3d.pipelines.anomaly.detect_anomalies`, :func:`meddiff3d.pipelines.generation.generate`); it runs in a
scratch folder and returns ``(result file, info)``: a ``.seg.nrrd`` for label results, a float NIfTI otherwise,
always on the input image's grid and affine. Every input's header is checked first (its grid within
:data:`~meddiff3d.label.request.MAX_REQUEST_VOXELS`), before any voxel is read or any model loaded.
:func:`run_request` runs one request in a scratch folder it removes, and registers the files it makes there with the
names of the user's images (:class:`~meddiff3d.label.request.RequestNames`), so messages never show scratch paths.
Plain Python (no MONAI Label): the app's infer tasks call these.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meddiff3d.errors import InputError
from meddiff3d.utils.io import read_channels
from meddiff3d.label.params import ANOMALY_PARAMS, GENERATION_PARAMS, MODEL_OWN, SEGMENTATION_PARAMS, ParamSpec
from meddiff3d.label.request import RequestNames, check_input_grid
from meddiff3d.label.slicer_io import (ANOMALY_SEGMENTS, BRATS_SEGMENTS, Segment, segments_info, write_float_volume,
                                       write_seg_nrrd)

logger = logging.getLogger("meddiff3d.label")

__all__ = ["BundleModel", "load_bundle", "KINDS", "run_segmentation", "run_anomaly", "run_generation",
           "resample_to_reference", "result_path"]

#: the ``evaluator`` of a bundle's inference config -> served kind
KINDS = {"meddiff3d.pipelines.segmentation.SegmentationEvaluator": "segmentation",
         "meddiff3d.pipelines.anomaly.AnomalyEvaluator": "anomaly",
         "meddiff3d.pipelines.generation.GenerationEvaluator": "generation"}
#: config keys naming the model files of each kind
MODEL_FILES = {"segmentation": ("model_path",), "anomaly": ("codec_path", "diffusion_path", "calibration_path"),
               "generation": ("codec_path", "diffusion_path")}
PARAMS: dict[str, Sequence[ParamSpec]] = {"segmentation": SEGMENTATION_PARAMS, "anomaly": ANOMALY_PARAMS,
                                          "generation": GENERATION_PARAMS}
#: request keys a kind takes besides its parameters (not shown as options)
EXTRA_KEYS: dict[str, tuple[str, ...]] = {"segmentation": ("sequences",), "anomaly": (), "generation": ()}
SEGMENTS: dict[str, Sequence[Segment]] = {"segmentation": BRATS_SEGMENTS, "anomaly": ANOMALY_SEGMENTS,
                                          "generation": ()}
DESCRIPTIONS = {
    "segmentation": "BraTS tumour segmentation by conditional diffusion (4 sequences in: t1, t1ce, t2, flair); "
                    "result=prob|variance|entropy gives a float volume of one region",
    "anomaly": "Anomaly detection by latent-diffusion healing (T1 in); result=anomaly_map|healed gives a float volume",
    "generation": "T1 brain MRI generation (covariates, steps, seed, guidance); float volume on the input's grid",
}


@dataclass
class BundleModel:
    """A served bundle: ``name``, ``kind``, folder, model ``files`` and settings read from its configs."""

    name: str
    kind: str
    root: Path
    files: dict[str, Path]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def missing(self) -> list[str]:
        return [f"{key} {path}" for key, path in self.files.items() if not path.is_file()]

    @property
    def params(self) -> Sequence[ParamSpec]:
        return PARAMS[self.kind]

    @property
    def extra_keys(self) -> tuple[str, ...]:
        return EXTRA_KEYS[self.kind]

    @property
    def labels(self) -> dict[str, int]:
        return dict(segments_info(SEGMENTS[self.kind]))


def load_bundle(root: str | os.PathLike, name: str | None = None) -> BundleModel:
    """Read a bundle folder's configs; raises :class:`InputError` if it is not one of the three kinds."""
    from monai.bundle import ConfigParser

    root = Path(root)
    configs = [root / "configs" / "common.yaml", root / "configs" / "inference.yaml"]
    if (root / "configs" / "label.yaml").is_file():
        configs.append(root / "configs" / "label.yaml")
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise InputError(f"{root} is not a meddiff3d bundle (missing {', '.join(missing)})")
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser["bundle_root"] = str(root)
    evaluator = parser.get("evaluator")
    target = evaluator.get("_target_") if isinstance(evaluator, dict) else None
    kind = KINDS.get(str(target))
    if kind is None:
        raise InputError(f"bundle {root}: its inference evaluator is {target!r}; servable: {', '.join(KINDS)}")
    files = {key: Path(parser.get_parsed_content(key)) for key in MODEL_FILES[kind]}
    settings = {key: parser.get_parsed_content(key) for key in ("device", "amp") if key in parser}
    return BundleModel(name or root.name, kind, root, files, settings)


def result_path(suffix: str) -> Path:
    """A fresh file for one finished result, outside the request's scratch folder (MONAI Label deletes it after
    sending it)."""
    fd, name = tempfile.mkstemp(prefix="meddiff3d-result-", suffix=suffix)
    os.close(fd)
    return Path(name)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ segmentation
def run_segmentation(model: BundleModel, sequences: Sequence[Path], params: Mapping[str, Any],
                     work_dir: Path) -> tuple[Path, dict]:
    """The segmentation bundle on four sequence files (t1, t1ce, t2, flair) -> label ``.seg.nrrd`` or one region's
    probability / variance / entropy (float NIfTI), on the grid of the sequences."""
    from meddiff3d.data.brats import BRATS_REGIONS
    from meddiff3d.label.sequences import sequences_datalist

    datalist = sequences_datalist(sequences, "case", work_dir / "datalist.json")
    outputs = segment_case(model, datalist, work_dir / "out", params)
    if params["result"] == "label":
        labels, affine = _read(outputs["seg"])
        out = write_seg_nrrd(labels, affine, work_dir / "result.seg.nrrd", BRATS_SEGMENTS)
        return out, {"result": "label", "labels": model.labels}
    maps, affine = read_channels(outputs[params["result"]])  # vectors (X, Y, Z, 1, 3) -> (X, Y, Z, 3): WT, TC, ET
    channel = list(BRATS_REGIONS).index(params["region"])
    out = write_float_volume(maps[..., channel], affine, work_dir / "result.nii.gz",
                             f"meddiff3d segdiff {params['result']} {params['region']}")
    return out, {"result": params["result"], "region": params["region"]}


def segment_case(model: BundleModel, datalist: Path, output_dir: Path, params: Mapping[str, Any]) -> dict[str, Path]:
    """Adapter to the segmentation pipeline (the one place that knows its signature and output names)."""
    from meddiff3d.pipelines.segmentation import output_paths, segment

    segment(model.files["model_path"], datalist, section="test", output_dir=output_dir,
            num_samples=params["num_samples"], sampler=params["sampler"], steps=params["steps"], seed=params["seed"],
            threshold=params["threshold"], device=model.settings.get("device", "auto"),
            amp=model.settings.get("amp", "auto"), progress=False)
    return output_paths(output_dir, "case")


# ------------------------------------------------------------------------------------------------ anomaly
def run_anomaly(model: BundleModel, image: Path, params: Mapping[str, Any], work_dir: Path) -> tuple[Path, dict]:
    """The anomaly bundle on one T1 file -> binary mask ``.seg.nrrd``, or the anomaly map / healed image (float
    NIfTI), on the input's grid."""
    from meddiff3d.pipelines.anomaly import OUTPUT_SUFFIXES, detect_anomalies

    if not image or not Path(image).is_file():
        raise InputError("no input image: give an image id of the datastore or upload a T1 file")
    check_input_grid(image)
    link = anomaly_link(image, work_dir)
    os.symlink(Path(image).absolute(), link)
    cases = detect_anomalies(model.files["codec_path"], model.files["diffusion_path"],
                             model.files["calibration_path"], [str(link)], work_dir / "out",
                             device=model.settings.get("device", "auto"), amp=model.settings.get("amp", "auto"),
                             progress=False)
    out_file = work_dir / "out" / f"case{OUTPUT_SUFFIXES[params['result']]}"
    volume, affine = _read(out_file)
    info = {"result": params["result"], "volume_score": cases[0]["volume_score"], "anomalous": cases[0]["anomalous"]}
    if params["result"] == "mask":
        out = write_seg_nrrd(volume.astype(np.uint8), affine, work_dir / "result.seg.nrrd", ANOMALY_SEGMENTS)
        return out, {**info, "labels": model.labels}
    return write_float_volume(volume, affine, work_dir / "result.nii.gz", f"meddiff3d {params['result']}"), info


def anomaly_link(image: Path, work_dir: Path) -> Path:
    """The name :func:`run_anomaly` gives its input in ``work_dir``: the fixed case id ``case`` whatever the user's
    name for it, with the image's suffix."""
    suffix = next((s for s in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
                   if str(image).lower().endswith(s)), "")
    return work_dir / f"case{suffix}"


# ------------------------------------------------------------------------------------------------ generation
def resample_to_reference(volume: np.ndarray, affine: np.ndarray, ref_shape: Sequence[int],
                          ref_affine: np.ndarray) -> np.ndarray:
    """``volume`` (RAS ``affine``) resampled (trilinear, 0 outside) onto the reference grid, in world coordinates."""
    from scipy.ndimage import affine_transform

    matrix = np.linalg.inv(np.asarray(affine, np.float64)) @ np.asarray(ref_affine, np.float64)
    volume = np.asarray(volume, np.float32)
    kwargs = dict(matrix=matrix[:3, :3], offset=matrix[:3, 3], output_shape=tuple(int(s) for s in ref_shape))
    values = affine_transform(volume, order=1, mode="nearest", **kwargs)  # edge voxels exact despite rounding
    # inside the volume by the half-voxel rule (nearest index in range), so rounding errors at the edges do not matter
    inside = affine_transform(np.ones_like(volume), order=0, mode="grid-constant", cval=0.0, **kwargs)
    return values * inside


def run_generation(model: BundleModel, reference: Path, params: Mapping[str, Any],
                   work_dir: Path) -> tuple[Path, dict]:
    """The generation bundle -> one float NIfTI sample resampled onto the reference image's grid and affine."""
    from meddiff3d.checks import check_memory
    from meddiff3d.pipelines.generation import generate

    if not reference or not Path(reference).exists():
        raise InputError("generation needs a reference image for the output geometry: give an image id of the "
                         "datastore or upload a file")
    ref = check_input_grid(reference, "reference image")
    # the sample resampled onto the reference grid: values, inside mask and the written copy, float32 each
    check_memory(f"reference image {reference}: a result on its grid {tuple(ref.shape)}",
                 12 * int(np.prod(ref.shape)))
    paths = generate(model.files["codec_path"], model.files["diffusion_path"], covariates=params["covariates"],
                     num_samples=1, sampler=None if params["sampler"] == MODEL_OWN else params["sampler"],
                     steps=params["steps"],
                     guidance_scale=params["guidance_scale"], seed=params["seed"], output_dir=work_dir / "out",
                     device=model.settings.get("device", "auto"), amp=model.settings.get("amp", "auto"),
                     progress=False)
    volume, affine = _read(paths[0])
    on_reference = resample_to_reference(volume, affine, ref.shape, ref.affine)
    out = write_float_volume(on_reference, ref.affine, work_dir / "result.nii.gz",
                             f"meddiff3d generated seed {params['seed']}")
    return out, {"result": "image", "seed": params["seed"], "covariates": params["covariates"],
                 "model_grid": {"shape": list(volume.shape), "affine": affine.tolist()}}


RUNNERS = {"segmentation": run_segmentation, "anomaly": run_anomaly, "generation": run_generation}


def run_request(model: BundleModel, image: str | None, params: Mapping[str, Any], parsed: Mapping[str, Any],
                uri_of, names: RequestNames | None = None) -> tuple[Path, dict]:
    """One request in a scratch folder (removed afterwards): resolve inputs, run the bundle, return the result file
    (moved out of the scratch folder, see :func:`result_path`).

    ``names`` (the user's names of the request's images) learns the scratch files made from them, so an error
    raised on one of those names the user's image.
    """
    from meddiff3d.label.sequences import BRATS_MODALITIES, resolve_sequences, split_paths

    names = names if names is not None else RequestNames()
    work_dir = Path(tempfile.mkdtemp(prefix=f"meddiff3d-{model.name}-"))
    names.add_folder(work_dir)
    user_name = names.name_of(image) if image else ""
    try:
        if model.kind == "segmentation":
            for path, modality in zip(split_paths(work_dir), BRATS_MODALITIES):  # a 4D image's channels
                names.add(path, f"{user_name} (channel {modality})", basename=True)
            sequences = resolve_sequences(image, params, work_dir, uri_of)
            out, info = run_segmentation(model, sequences, parsed, work_dir)
        else:
            if image and model.kind == "anomaly":
                names.add(anomaly_link(Path(image), work_dir), user_name, basename=True)
            out, info = RUNNERS[model.kind](model, Path(image) if image else None, parsed, work_dir)
        final = result_path("".join(out.suffixes))
        shutil.move(str(out), str(final))
        return final, info
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
