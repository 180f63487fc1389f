"""Checkpoint files: what they hold, how they are written (atomically) and how they are read back (weights-only).

Training checkpoint (``RUN_DIR/checkpoints/last.pt``, optionally also ``iter_NNNNNNNN.pt`` for the last K)::

    {"format": "meddiff3d.checkpoint/1",
     "iteration": int,            # optimiser steps taken
     "epoch": int,                # ignite epoch counter (informational)
     "model": state_dict,         # the trained network (never the DDP wrapper: no "module." prefix)
     "ema": state_dict,           # EMA weights, loadable into the same bare network
     "ema_num_updates": int,
     "optimizer": optimizer.state_dict(),
     "grad_scaler": dict,         # empty unless fp16 with a GradScaler
     "rng": {"world_size": int, "per_rank": [rng_state, ...]},   # see capture_rng_state
     "train_config": dict,        # the trainer's settings (lr, ema decay, batch size, seed, ...)
     "meta": dict}                # JSON-able; everything inference needs, e.g. {"network": {"class", "args"}, ...}

Inference export (``RUN_DIR/inference.pt``): ``{"format": "meddiff3d.inference/1", "iteration", "ema", "meta"}``.

Codec file (``models/autoencoder.pt``, :func:`meddiff3d.models.codec.save_codec`):
``{"format": "meddiff3d.codec/1", "weights": LatentCodec state_dict (latent scale/shift included), "meta"}``.

All hold only tensors and plain Python values, so ``torch.load(path, weights_only=True)`` reads them
(:func:`read_file`). What a file holds is named by one scheme, ``meddiff3d.<kind>/<version>``: the file format
(``format``) and, for network files, the model kind in ``meta["kind"]`` (:func:`kind_tag`, :func:`kind_of`); the
first files, written before that scheme, carry older tags that :data:`LEGACY_KIND_TAGS` maps.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from meddiff3d.errors import InputError
from meddiff3d.utils.io import atomic_path

CHECKPOINT_FORMAT = "meddiff3d.checkpoint/1"
INFERENCE_FORMAT = "meddiff3d.inference/1"
CODEC_FORMAT = "meddiff3d.codec/1"
FILE_FORMATS = (CHECKPOINT_FORMAT, INFERENCE_FORMAT, CODEC_FORMAT)
#: the kinds of model file, each tagged ``meddiff3d.<kind>/1`` (:func:`kind_tag`)
MODEL_KINDS = ("codec", "latent_diffusion", "segmentation_diffusion", "seg_baseline")
#: tags of files written before the one scheme (the shipped demo weights among them) -> their kind
LEGACY_KIND_TAGS = {"latent_diffusion": "latent_diffusion", "segmentation_diffusion": "segmentation_diffusion",
                    "meddiff3d.brats_seg_baseline/1": "seg_baseline"}
_LIST_LIMIT = 8
#: a checkpoint names its network class; only classes from these packages are imported (files may be untrusted)
TRUSTED_NETWORK_MODULES = ("monai.", "meddiff3d.", "torch.nn.")


# ----------------------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict:
    """This process's torch (CPU and every CUDA device), numpy and python ``random`` states, as tensors and lists."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: Mapping) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))


# --------------------------------------------------------------------------------------------------- write / read
def jsonable(meta: Any, what: str = "meta") -> Any:
    """``meta`` as plain JSON types (tuples become lists); an :class:`InputError` if it is not JSON-serialisable."""
    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as err:
        raise InputError(f"{what} must be JSON-serialisable (plain dicts, lists, numbers, strings): {err}") from err


def save_file(payload: Mapping, path: str | os.PathLike) -> Path:
    """``torch.save`` through a temporary file renamed into place: a killed writer never leaves a partial file."""
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return Path(path)


def read_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint") -> dict:
    """Load a checkpoint, inference export or codec file with ``weights_only=True``; clear errors (naming the file as
    ``what``) for missing, unreadable or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise InputError(f"{what} {path} cannot be read as a weights-only torch file ({type(err).__name__}: "
                         f"{err})") from err
    if not isinstance(data, dict) or data.get("format") not in FILE_FORMATS:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{what} {path} is not a meddiff3d file (format {found!r}, expected one of "
                         f"{', '.join(FILE_FORMATS)})")
    return data


def kind_tag(kind: str, version: int = 1) -> str:
    """The tag of a model kind in the one naming scheme: ``meddiff3d.<kind>/<version>``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {', '.join(MODEL_KINDS)}")
    return f"meddiff3d.{kind}/{version}"


def kind_of(data: Mapping) -> str | None:
    """The model kind of a file's content (:func:`read_file`): ``"codec"`` by its format, else from ``meta["kind"]``
    (current or legacy tag); ``None`` when it names none."""
    if data.get("format") == CODEC_FORMAT:
        return "codec"
    tag = str((data.get("meta") or {}).get("kind"))
    if tag in LEGACY_KIND_TAGS:
        return LEGACY_KIND_TAGS[tag]
    name = tag.removeprefix("meddiff3d.").rpartition("/")[0]
    return name if tag.startswith("meddiff3d.") and name in MODEL_KINDS else None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (recorded in sidecars and calibrations to tie results to model files)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def export_inference(checkpoint: Mapping, path: str | os.PathLike) -> Path:
    """Write the small inference file (EMA weights + meta) from a full training checkpoint payload."""
    payload = {
        "format": INFERENCE_FORMAT,
        "iteration": int(checkpoint["iteration"]),
        "ema": checkpoint["ema"],
        "meta": checkpoint["meta"],
    }
    return save_file(payload, path)


# ------------------------------------------------------------------------------------------------ architecture
def _strip_ddp_prefix(state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LIST_LIMIT])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else shown


def check_state_fits(state: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    """Raise an :class:`InputError` naming ``source`` and every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} in the network"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        parts.append(f"shape mismatches: {_listing(shapes)}")
    raise InputError(
        f"{source} does not fit the network {type(model).__name__} (a checkpoint of a different architecture?); "
        + "; ".join(parts)
    )


def load_checkpoint(
    path: str | os.PathLike,
    model: torch.nn.Module | None = None,
    *,
    weights: str = "ema",
    map_location: str | torch.device = "cpu",
) -> dict:
    """Read a checkpoint or inference export and, if ``model`` is given, load its ``weights`` into it.

    Args:
        path: ``last.pt``, ``iter_*.pt`` or ``inference.pt``.
        model: the bare network (a ``DistributedDataParallel`` wrapper is unwrapped).
        weights: ``"ema"`` (default; the averaged weights, present in both file kinds) or ``"model"`` (the raw
            trained weights, training checkpoints only).

    Returns the whole file content (``meta``, ``iteration``, ...). Raises :class:`InputError` naming the file and the
    missing / unexpected / mis-shaped keys when the weights belong to a different architecture.
    """
    data = read_file(path, map_location)
    if model is not None:
        load_weights(data, model, weights, source=f"checkpoint {path}")
    return data


def load_weights(data: Mapping, model: torch.nn.Module, weights: str = "ema", source: str = "checkpoint",
                 *, assign: bool = False) -> None:
    """Load ``data[weights]`` (a file's content from :func:`read_file`) into ``model`` after checking it fits.

    ``assign=True`` makes the file's tensors the model's parameters instead of copying them, for a model built on the
    ``meta`` device (:func:`build_network` ``(meta, device="meta")``): the weights then exist once in memory, not twice.
    """
    if weights not in data:
        raise InputError(f"{source} has no {weights!r} weights (it holds: {', '.join(sorted(data))})")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    state = _strip_ddp_prefix(data[weights])
    check_state_fits(state, model, f"{source} ({weights!r} weights)")
    model.load_state_dict(state, assign=assign)
    if assign:
        left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise InputError(f"{source}: {_listing(left)} not in the file's {weights!r} weights")
        model.float()  # the file's dtype became the parameters' dtype: compute in float32 as a built network would


def build_network(meta: Mapping, device: str | torch.device | None = None) -> torch.nn.Module:
    """Instantiate ``meta["network"]["class"]`` (an import path) with ``meta["network"]["args"]``.

    ``meta`` may be a whole checkpoint meta or just its ``"network"`` entry, e.g.
    ``{"class": "monai.networks.nets.DiffusionModelUNet", "args": {"spatial_dims": 3, ...}}``. ``device="meta"``
    allocates no weights (to be filled by :func:`load_weights` ``(..., assign=True)``).
    """
    spec = meta.get("network", meta) if isinstance(meta, Mapping) else None
    if not isinstance(spec, Mapping) or "class" not in spec:
        raise InputError(
            "meta has no network description: expected {'network': {'class': 'package.module.Class', 'args': {...}}}"
        )
    class_path, args = spec["class"], dict(spec.get("args") or {})
    if not str(class_path).startswith(TRUSTED_NETWORK_MODULES):
        raise InputError(f"network class {class_path!r} is outside the trusted packages {TRUSTED_NETWORK_MODULES}")
    module_name, _, class_name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as err:
        raise InputError(f"network class {class_path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise InputError(f"network class {class_path!r} is not a torch.nn.Module subclass")
    try:
        if device is None:
            return cls(**args)
        with torch.device(device):
            return cls(**args)
    except TypeError as err:
        raise InputError(f"network class {class_path!r} rejects the arguments {sorted(args)}: {err}") from err
