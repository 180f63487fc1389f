"""Reconstruction commands of the image diffusion model: undersampled k-space and super-resolution from files.

``reconstruct(model, inputs, output_dir, task=...)`` reads every input first (and checks it against the model),
then solves each with :func:`~meddiff3d.pipelines.inverse_problems.diffusion_reconstruction` and writes, per input
``<id>``:

* ``<id>_recon.nii.gz`` -- the estimate (posterior mean of ``num_samples`` samples), 2D NIfTI in the input's units;
* ``<id>_std.nii.gz`` -- the samples' per-pixel standard deviation (with ``num_samples > 1``);
* ``<id>_baseline.nii.gz`` -- zero-filled (k-space) or bicubic (super-resolution), for comparison;
* ``<id>_recon.png`` -- [reference,] baseline and estimate side by side, each windowed to the reference's range;
* ``<id>.json`` -- settings, mask, model hash, seconds, and with a reference PSNR / SSIM / NMSE of the estimate
  (``recon``) and of the baseline (``baseline``, named by ``baseline_method``).

Inputs (``task``):

``kspace``
    a ``.npy`` of complex k-space ``(H, W)`` in the centred orthonormal convention
    (:func:`~meddiff3d.diffusion.fft2c`), sampled where it is non-zero (or where ``mask`` says: a ``.npy`` of 0/1
    ``(W,)`` or ``(H, W)``); or a 2D image (PNG, DICOM, NIfTI, ...) whose k-space is simulated with a Cartesian
    ``mask_kind`` mask at ``acceleration`` (centre ``center_fraction``), the image then being the reference.
``super_resolution``
    a 2D image: of the model's size (the reference, block-averaged by ``factor`` to simulate the low-resolution
    image), or of the model's size divided by ``factor`` (a real low-resolution image; no reference).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff3d.checks import check_choice, check_int, check_number, check_output_dir, safe_name
from meddiff3d.data.images2d import read_image_2d
from meddiff3d.diffusion import Downsample, KSpaceSampling, cartesian_mask
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.engine.reconstruction_metrics import reconstruction_scores
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import class_labels
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.pipelines.inferers import ImageDiffusionInferer
from meddiff3d.pipelines.inverse_problems import diffusion_reconstruction, interpolate, nmse, zero_filled
from meddiff3d.utils.io import save_image_nifti, save_image_png, save_json

__all__ = ["TASKS", "reconstruct", "read_measurement", "ReconstructionInputs", "ReconstructionEvaluator"]

TASKS = ("kspace", "super_resolution")


def _npy(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as err:
        raise InputError(f"{path}: unreadable {what} .npy ({type(err).__name__}: {err})") from None


def read_measurement(path: Path, task: str, shape: Sequence[int], *, mask: Path | None = None,
                     acceleration: float = 4, center_fraction: float = 0.08, mask_kind: str = "random",
                     factor: int = 2, seed: int = 0) -> dict[str, Any]:
    """``{"operator", "y", "reference" (or None), "spacing", "mask" (k-space lines, or None)}`` for one input,
    checked against the model's image ``shape``."""
    shape = [int(s) for s in shape]
    if task == "kspace" and path.suffix.lower() == ".npy":
        k = _npy(path, "k-space")
        if k.ndim != 2 or not np.iscomplexobj(k) or list(k.shape) != shape:
            raise InputError(f"{path}: k-space must be a complex (H, W) array of the model's size {shape}, got "
                             f"{k.dtype} {list(k.shape)}")
        if not np.isfinite(k).all():
            raise InputError(f"{path}: k-space has non-finite values")
        sampled = (_npy(mask, "mask") if mask is not None else (k != 0)).astype(np.float32)
        if sampled.shape not in ((shape[1],), tuple(shape)) or not set(np.unique(sampled)) <= {0.0, 1.0}:
            raise InputError(f"{mask or path}: the mask must be 0/1 of shape ({shape[1]},) or {tuple(shape)}")
        if sampled.ndim == 2 and (sampled == sampled[:1]).all():
            sampled = sampled[0]
        y = torch.from_numpy(k.astype(np.complex64))[None, None] * torch.from_numpy(sampled)
        return {"operator": KSpaceSampling(torch.from_numpy(sampled)), "y": y, "reference": None,
                "spacing": [1.0, 1.0], "mask": sampled.tolist() if sampled.ndim == 1 else None}
    if mask is not None:
        raise InputError(f"{path}: --mask goes with a k-space .npy input; an image's k-space is simulated with "
                         f"--acceleration / --center_fraction / --mask_kind")
    image = read_image_2d(path)
    x = torch.from_numpy(image.array)[None, None]
    if task == "kspace":
        if list(image.shape) != shape:
            raise InputError(f"{path}: image of {list(image.shape)} pixels; the model reconstructs {shape}")
        lines = cartesian_mask(shape[1], acceleration, center_fraction, mask_kind, seed=seed)
        operator = KSpaceSampling(lines.float())
        return {"operator": operator, "y": operator.forward(x), "reference": x, "spacing": list(image.spacing),
                "mask": lines.int().tolist(), "simulated": {"acceleration": acceleration,
                                                             "center_fraction": center_fraction, "kind": mask_kind}}
    if any(s % factor for s in shape):
        raise InputError(f"{path}: super-resolution by --factor {factor} needs the model's size {shape} to be a "
                         f"multiple of it")
    operator = Downsample((factor, factor))
    if list(image.shape) == shape:
        return {"operator": operator, "y": operator.forward(x), "reference": x, "spacing": list(image.spacing),
                "mask": None}
    if [s * factor for s in image.shape] == shape:
        return {"operator": operator, "y": x, "reference": None,
                "spacing": [s / factor for s in image.spacing], "mask": None}
    raise InputError(f"{path}: image of {list(image.shape)} pixels is neither the model's size {shape} nor it "
                     f"divided by --factor {factor}")


class ReconstructionInputs(torch.utils.data.Dataset):
    """A reconstruction's inputs: items ``{"id", "path"}`` from a 2D datalist's ``section`` (``None``: the test
    section) or from files (k-space ``.npy`` or 2D images, the id from the file name), checked on first use."""

    def __init__(self, inputs: Any, section: str | None = None) -> None:
        self.inputs, self.section = inputs, section
        self._items: list[dict[str, Any]] | None = None

    @property
    def items(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = self._read()
        return self._items

    def _read(self) -> list[dict[str, Any]]:
        inputs = self.inputs
        if isinstance(inputs, (str, Path)) and str(inputs).lower().endswith(".json"):
            from meddiff3d.data.datalist import load_datalist

            items = load_datalist(inputs, self.section or "test", modalities=1, check_images="header")
            found = [{"id": safe_name("datalist id", str(it.get("id") or Path(it["image"]).name.split(".")[0])),
                      "path": Path(it["image"])} for it in items]
        else:
            if self.section is not None:
                raise InputError(f"section {self.section!r} goes with a datalist input; the inputs are files")
            paths = [Path(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else list(inputs or []))]
            found = [{"id": safe_name("input name", p.name.split(".")[0]), "path": p} for p in paths]
        if not found:
            raise InputError("no inputs given (a 2D datalist JSON, or k-space .npy / 2D image files)")
        ids = [f["id"] for f in found]
        if len(set(ids)) != len(ids):
            raise InputError(f"inputs share a name: {sorted({i for i in ids if ids.count(i) > 1})}")
        for item in found:
            if not item["path"].is_file():
                raise InputError(f"{item['path']}: no such input file")
        return found

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class ReconstructionEvaluator:
    """A bundle's reconstruction ``evaluator``: ``run()`` reads every input of ``dataset``
    (:class:`ReconstructionInputs`) as a measurement of ``task`` (:func:`read_measurement`), then solves each with
    :func:`~meddiff3d.pipelines.inverse_problems.diffusion_reconstruction` (``network`` and its
    :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer`) and writes the files of the module docstring;
    returns the ``_recon.nii.gz`` paths. Input ``i``'s simulated mask and its posterior samples are seeded with
    ``seed + i`` and ``seed``."""

    def __init__(self, network: torch.nn.Module, inferer: ImageDiffusionInferer, dataset: Sequence[Mapping[str, Any]],
                 output_dir: Any, *, task: str = "kspace", mask: Any = None, acceleration: float = 4,
                 center_fraction: float = 0.08, mask_kind: str = "random", factor: int = 2, num_samples: int = 4,
                 noise_std: float = 0.0, class_name: str | None = None, seed: int = 0,
                 model: LoadedModel | None = None) -> None:
        self.network, self.inferer, self.dataset, self.output_dir, self.model = (network, inferer, dataset,
                                                                                 output_dir, model)
        self.task = check_choice("task", task, TASKS)
        self.factor = check_int("factor", factor, 2, 16)
        self.num_samples = check_int("num_samples", num_samples, 1, 1000)
        self.noise_std = check_number("noise_std", noise_std, 0)
        self.seed = check_int("seed", seed, 0)
        self.mask = None if mask is None else Path(mask)
        self.simulation = {"acceleration": acceleration, "center_fraction": center_fraction, "mask_kind": mask_kind}
        self.class_name = class_name

    def run(self) -> list[Path]:
        meta = self.inferer.meta
        class_labels([self.class_name], meta.get("classes") or [])  # a known class (or none)
        items = [self.dataset[i] for i in range(len(self.dataset))]
        measurements = [read_measurement(Path(it["path"]), self.task, meta["image"]["shape"], mask=self.mask,
                                         factor=self.factor, seed=self.seed + i, **self.simulation)
                        for i, it in enumerate(items)]
        out = check_output_dir(self.output_dir)
        written = []
        for item, m in zip(tqdm(items, desc=f"reconstructing {len(items)} input(s)", unit="input"), measurements):
            start = time.perf_counter()
            estimate, spread = diffusion_reconstruction(self.network, self.inferer, m["operator"], m["y"],
                                                        num_samples=self.num_samples, seed=self.seed,
                                                        noise_std=self.noise_std, class_name=self.class_name,
                                                        nonnegative=self.task == "kspace")
            seconds = time.perf_counter() - start
            written.append(self._write(out, item, m, estimate.cpu(), spread, seconds))
        return written

    def _write(self, out: Path, item: Mapping[str, Any], m: Mapping[str, Any], estimate: torch.Tensor,
               spread: torch.Tensor | None, seconds: float) -> Path:
        case, task, factor = item["id"], self.task, self.factor
        baseline = (zero_filled(m["operator"], m["y"]) if task == "kspace" else
                    interpolate(m["y"], (factor, factor), "bicubic")).cpu()
        spacing = m["spacing"]
        path = save_image_nifti(estimate[0, 0].numpy(), spacing, out / f"{case}_recon.nii.gz")
        save_image_nifti(baseline[0, 0].numpy(), spacing, out / f"{case}_baseline.nii.gz")
        if spread is not None:
            save_image_nifti(spread[0, 0].cpu().numpy(), spacing, out / f"{case}_std.nii.gz")
        reference = m["reference"]
        views = [v for v in (reference, baseline, estimate) if v is not None]
        low, high = (float(v) for v in (reference if reference is not None else estimate).quantile(
            torch.tensor([0.005, 0.995])))
        save_image_png(np.stack([((v[0, 0] - low) / max(high - low, 1e-8)).numpy() for v in views]),
                       out / f"{case}_recon.png", columns=len(views))
        record = {"input": str(item["path"]), "task": task, "num_samples": self.num_samples, **self.inferer.settings,
                  "seed": self.seed, "noise_std": self.noise_std, "class": self.class_name,
                  "model": self.model.provenance() if self.model is not None else None,
                  "seconds": round(seconds, 3), "baseline_method": "zero_filled" if task == "kspace" else "bicubic"}
        record.update({"mask": m["mask"], "simulated_mask": m.get("simulated")} if task == "kspace" else
                      {"factor": factor, "simulated_low_resolution": reference is not None})
        if reference is not None:  # scores on the reference's range mapped to [0, 1]
            low, span = float(reference.min()), max(float(reference.max() - reference.min()), 1e-8)
            for name, value in (("recon", estimate), ("baseline", baseline)):
                scores = reconstruction_scores(((value - low) / span).clamp(0, 1), (reference - low) / span)
                record[name] = {"psnr": scores["psnr"], "ssim": scores["ssim"], "nmse": nmse(value, reference)}
        save_json(record, out / f"{case}.json")
        return path


def reconstruct(model: Any, inputs: Any, output_dir: Any, *, task: str = "kspace", section: str | None = None,
                mask: Any = None, acceleration: float = 4, center_fraction: float = 0.08, mask_kind: str = "random",
                factor: int = 2, num_samples: int = 4, sampler: str | None = None, steps: int | None = None,
                seed: int = 0, noise_std: float = 0.0, class_name: str | None = None, device: str = "auto",
                amp: str = "auto") -> list[Path]:
    """Reconstruct every input (module docstring; ``inputs``: files, or a 2D datalist and its ``section``); returns
    the ``_recon.nii.gz`` paths. Built from the bundle's components (:class:`ReconstructionInputs`,
    :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer`, :class:`ReconstructionEvaluator`)."""
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    loaded = model if isinstance(model, LoadedModel) else load_model(model, "image_diffusion", device=dev, dtype=dtype)
    inferer = ImageDiffusionInferer(loaded.meta, sampler, steps)
    evaluator = ReconstructionEvaluator(loaded.network, inferer, ReconstructionInputs(inputs, section), output_dir,
                                        task=task, mask=mask, acceleration=acceleration,
                                        center_fraction=center_fraction, mask_kind=mask_kind, factor=factor,
                                        num_samples=num_samples, noise_std=noise_std, class_name=class_name,
                                        seed=seed, model=loaded)
    return evaluator.run()
