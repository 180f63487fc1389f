"""The pieces a bundle's inference config names as MONAI components, each a plain factory or small class.

=================  =========================================================================================
config id          built by
=================  =========================================================================================
``device``         :func:`meddiff3d.engine.precision.resolve_device` (``auto``: the GPU if there is one)
``*_file``         :func:`model_file`: a model file read once by the one loader (network + meta + provenance)
``network_def``    ``@<model>_file.network``: the MONAI network (e.g. ``DiffusionModelUNet``), EMA weights loaded
``network``        :func:`inference_network`: ``network_def`` on the device, readied for autocast (``amp``)
``inferer``        :mod:`meddiff3d.pipelines.inferers` (sampler, steps, guidance, decode strategy / ensemble)
``dataset``        :class:`DatalistDataset` (a datalist section or image files, read lazily),
                   :class:`GenerationRequests` (seeds x covariates) or :class:`ImageRequests` (seeds x class)
``preprocessing``  the task's factory of :mod:`meddiff3d.data.transforms` (a MONAI ``Compose``)
``postprocessing`` :func:`segmentation_postprocessing` (ensemble statistics back onto the input grid)
``evaluator``      the task's evaluator (``GenerationEvaluator``, ``SegmentationEvaluator``, ``AnomalyEvaluator``)
=================  =========================================================================================

Also here: :func:`export_decoder` and :func:`export_segmentation_denoiser`, the sub-networks that TorchScript can
hold (a generative bundle's ``network_def`` has more than one tensor input, so MONAI's ``ckpt_export`` does not apply).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.data import Dataset
from monai.transforms import Compose, MapTransform

from meddiff3d.checks import check_int, parse_covariates, safe_name
from meddiff3d.data.images import check_image
from meddiff3d.engine.precision import prepare_for_inference, resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.models.segdiff import ensemble_statistics

logger = logging.getLogger("meddiff3d.pipelines")

__all__ = ["model_file", "inference_network", "anomaly_models", "resolve_inputs", "DatalistDataset",
           "GenerationRequests", "ImageRequests",
           "EnsembleStatisticsd", "SelectChannelsd", "ToInputGridd", "segmentation_postprocessing",
           "export_decoder", "export_segmentation_denoiser"]

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


# ------------------------------------------------------------------------------------------------ networks
def model_file(path: str | os.PathLike, kind: str, *, device: str | torch.device = "cpu", amp: str = "none",
               **codec_options: Any) -> LoadedModel:
    """A model file loaded by :func:`meddiff3d.models.loading.load_model`; codecs are readied for ``amp`` (they
    encode/decode under autocast, channels-last), other networks stay float32 (see :func:`inference_network`)."""
    dev = resolve_device(device)
    if kind == "codec":
        dtype = resolve_precision(amp, dev, "inference").dtype
        codec_options = {"amp_dtype": dtype, "channels_last": dtype is not None, **codec_options}
    return load_model(path, kind, device=dev, **codec_options)


def inference_network(network: torch.nn.Module, device: str | torch.device = "auto",
                      amp: str = "auto") -> torch.nn.Module:
    """``network`` in eval mode on ``device``, its weights stored for autocast to the ``amp`` dtype
    (:func:`~meddiff3d.engine.precision.prepare_for_inference`; ``none``: float32, unchanged)."""
    dev = resolve_device(device)
    dtype = resolve_precision(amp, dev, "inference").dtype
    return prepare_for_inference(network.to(dev).eval(), dtype)


def anomaly_models(network: torch.nn.Module, autoencoder: torch.nn.Module, meta: Mapping[str, Any],
                   codec_meta: Mapping[str, Any]) -> Any:
    """A detector's :class:`~meddiff3d.anomaly.healing.AnomalyModels` from a bundle's ``network`` (the latent U-Net,
    run with its null condition) and ``autoencoder`` (the codec), as
    :func:`~meddiff3d.anomaly.healing.load_anomaly_models` builds them from the files."""
    from meddiff3d.anomaly.healing import AnomalyModels
    from meddiff3d.diffusion import schedule_from_dict
    from meddiff3d.models.ldm import build_denoiser, check_guidance_support, model_conditioning
    from meddiff3d.pipelines.inferers import autocast_dtype

    device = next(network.parameters()).device
    check_guidance_support(meta, "the diffusion model", conditional=False, guidance_scale=1.0)
    denoiser = build_denoiser(network, meta, conditional=False, amp_dtype=autocast_dtype(network))
    return AnomalyModels(autoencoder, dict(codec_meta), denoiser, schedule_from_dict(meta["schedule"]),
                         model_conditioning(meta, None, 1, device), dict(meta), device)


# ------------------------------------------------------------------------------------------------ datasets
def _case_id(path: Path) -> str:
    name = path.name
    for suffix in _IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _first(image: Any) -> Any:
    return image[0] if isinstance(image, (list, tuple)) else image


def resolve_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], section: str | None = None,
                   modalities: int | None = 1) -> list[dict]:
    """Items ``{"id", "image", ...}`` from a datalist JSON (its ``section``) or from image files (one per case),
    every voxel of every file read and checked as a model input (:func:`~meddiff3d.data.datalist.load_datalist`,
    :func:`~meddiff3d.data.images.check_image` with ``content=True``: real, not constant, plausible spacing)."""
    from meddiff3d.data.datalist import check_datalist, load_datalist

    if isinstance(inputs, (str, os.PathLike)) and str(inputs).lower().endswith(".json"):
        if section is None:  # every section with items, in datalist order
            sections = check_datalist(inputs, modalities=modalities, check_images=True, content=True)
            items = [it for found in sections.values() for it in found]
            logger.info("datalist %s: %s", inputs, ", ".join(f"{name} {len(found)} case(s)"
                                                             for name, found in sections.items() if found))
        else:
            items = load_datalist(inputs, section, modalities=modalities, check_images=True, content=True)
            logger.info("datalist %s: %s %d case(s)", inputs, section, len(items))
        return [dict(it, id=str(it.get("id") or _case_id(Path(_first(it["image"]))))) for it in items]
    files = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs or [])
    if not files:
        raise InputError("no input images given (pass a datalist JSON or a list of image files)")
    items, seen = [], {}
    for file in files:
        path = Path(file).expanduser().absolute()
        check_image(path, content=True)
        case = safe_name(f"the case id of {path}", _case_id(path))
        if case in seen:
            raise InputError(f"input images {seen[case]} and {path} give the same case id {case!r}")
        seen[case] = path
        items.append({"id": case, "image": str(path)})
    return items


class DatalistDataset(Dataset):
    """A MONAI ``Dataset`` over a datalist section (or a list of image files), read and checked on first use (so a
    config can build it before the data exist), each item passed through ``transform``.

    Args:
        datalist: a meddiff3d datalist JSON, or image files (one case each).
        section: the datalist section; ``None``: every section that has items (which ones, and how many cases, is
            logged).
        transform: the bundle's ``preprocessing``.
        modalities: image channels each item must have (``None``: the datalist's own ``modalities``).
        keys: keep only these item keys (e.g. ``["id", "image"]`` not to load labels); ``None``: all.
    """

    def __init__(self, datalist: Any, section: str | None = None, transform: Any = None, *,
                 modalities: int | None = None,
                 keys: Sequence[str] | None = None) -> None:
        self.datalist, self.section, self.modalities = datalist, section, modalities
        self.keys = None if keys is None else list(keys)
        self._items: list[dict] | None = None
        super().__init__(data=[], transform=transform)  # the items are read on first access

    @property
    def items(self) -> list[dict]:
        if self._items is None:
            items = resolve_inputs(self.datalist, self.section, self.modalities)
            self._items = items if self.keys is None else [{k: it[k] for k in self.keys if k in it} for it in items]
        return self._items

    def __len__(self) -> int:
        return len(self.items)

    def _transform(self, index: int) -> Any:
        item = dict(self.items[index])
        return self.transform(item) if self.transform is not None else item


class GenerationRequests(torch.utils.data.Dataset):
    """What generation is asked for: ``num_samples`` items ``{"seed": seed + i, "covariates": {...} | None}``.

    ``covariates``: ``{name: value in [0, 1]}`` or ``None`` (also ``{}``, ``"null"``, ``"none"``) for the null
    condition; the values are checked here, the names against the model by the evaluator.
    """

    def __init__(self, covariates: Mapping[str, float] | str | None = None, num_samples: int = 1,
                 seed: int = 0) -> None:
        self.covariates = parse_covariates(covariates)
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.seed = check_int("seed", seed, 0)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return {"seed": self.seed + index, "covariates": self.covariates}


class ImageRequests(GenerationRequests):
    """What 2D image generation is asked for: ``num_samples`` items ``{"seed": seed + i, "class": class_name}``
    (``class_name`` ``None``: unconditional; checked against the model by the evaluator)."""

    def __init__(self, class_name: str | None = None, num_samples: int = 1, seed: int = 0) -> None:
        if class_name is not None and not isinstance(class_name, str):
            raise InputError(f"class_name must be a class name or null, got {class_name!r}")
        super().__init__(None, check_int("num_samples", num_samples, 1, 100_000), seed)
        self.class_name = class_name

    def __getitem__(self, index: int) -> dict[str, Any]:
        request = super().__getitem__(index)
        return {"seed": request["seed"], "class": self.class_name}


# ------------------------------------------------------------------------------------------------ postprocessing
class EnsembleStatisticsd(MapTransform):
    """Samples ``(N, R, *spatial)`` in ``mask_range`` under ``key`` -> ``prob`` (the members' vote), ``variance``,
    ``entropy`` (``(R, *spatial)``, :func:`meddiff3d.models.segdiff.ensemble_statistics`); the samples are dropped."""

    def __init__(self, keys: Hashable | Sequence[Hashable] = "pred",
                 mask_range: Sequence[float] = (-1.0, 1.0)) -> None:
        super().__init__(keys)
        self.mask_range = tuple(float(v) for v in mask_range)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d.update(ensemble_statistics(torch.as_tensor(d.pop(key)).cpu(), self.mask_range))
        return d


class SelectChannelsd(MapTransform):
    """``d[out_key] = d[key][channels]`` (a plain tensor), e.g. the FLAIR channel of the sequences for a preview."""

    def __init__(self, keys: Hashable, channels: Sequence[int], out_key: str) -> None:
        super().__init__(keys)
        self.channels, self.out_key = [int(c) for c in channels], out_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            d[self.out_key] = torch.as_tensor(value.as_tensor() if hasattr(value, "as_tensor") else value)[
                self.channels]
        return d


class ToInputGridd(MapTransform):
    """Network-grid tensors ``(C, *spatial)`` under ``keys`` -> the grid and affine of the file ``d[ref_key]`` was
    read from (:func:`meddiff3d.data.transforms.to_input_grid`)."""

    def __init__(self, keys: Hashable | Sequence[Hashable], ref_key: str = "image", mode: str = "bilinear",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.mode = ref_key, mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from meddiff3d.data.transforms import to_input_grid

        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_input_grid(d[key], d, key=self.ref_key, mode=self.mode)
        return d


def segmentation_postprocessing(flair_channel: int = 3, mask_range: Sequence[float] = (-1.0, 1.0)) -> Compose:
    """Ensemble samples (``pred``, in the model's ``mask_range``) -> probability (the members' vote), variance,
    entropy + the FLAIR channel, on the input grid."""
    return Compose([EnsembleStatisticsd("pred", mask_range), SelectChannelsd("image", [flair_channel], "flair"),
                    ToInputGridd(["prob", "variance", "entropy", "flair"], ref_key="image")])


# ------------------------------------------------------------------------------------------------ exports
class _Decoder(torch.nn.Module):
    def __init__(self, codec: torch.nn.Module) -> None:
        super().__init__()
        self.autoencoder = codec.autoencoder
        self.register_buffer("latent_scale", codec.latent_scale.detach().clone())
        self.register_buffer("latent_shift", codec.latent_shift.detach().clone())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(z / self.latent_scale + self.latent_shift)


class _SegmentationDenoiser(torch.nn.Module):
    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.network(x, timesteps=timesteps)


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], path: str | os.PathLike | None):
    module = module.float().cpu().eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(traced, str(path))
    return traced


def export_decoder(codec_path: str | os.PathLike, path: str | os.PathLike | None = None,
                   latent_shape: Sequence[int] | None = None) -> torch.jit.ScriptModule:
    """The codec's decoder as TorchScript: normalised latent ``(B, C, *latent)`` -> image (latent scale/shift
    inside), traced at ``latent_shape`` (default: the codec meta's); saved to ``path`` if given."""
    loaded = load_model(codec_path, "codec")
    shape = list(latent_shape or loaded.meta["latent"]["shape"])
    return _export(_Decoder(loaded.network), (torch.zeros(1, *shape),), path)


def export_segmentation_denoiser(model_path: str | os.PathLike, path: str | os.PathLike | None = None,
                                 patch_size: Sequence[int] | None = None) -> torch.jit.ScriptModule:
    """The segmentation U-Net as TorchScript: ``(x, timesteps)`` -> its prediction, where ``x`` holds the noisy mask,
    the sequences and the coordinate channels (``meta["inputs"]["order"]``); traced at ``patch_size`` (default:
    the training patch). Fully convolutional, so other multiples of the network divisor work too."""
    loaded = load_model(model_path, "segmentation_diffusion")
    args = loaded.meta["network"]["args"]
    shape = list(patch_size or loaded.meta["patch"]["size"])
    example = (torch.zeros(1, int(args["in_channels"]), *shape), torch.zeros(1, dtype=torch.long))
    return _export(_SegmentationDenoiser(loaded.network), example, path)
