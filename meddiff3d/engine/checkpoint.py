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
import pickle
import pickletools
import random
import re
import warnings
import zipfile
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
#: the entries of a training checkpoint a resume reads
RESUME_KEYS = ("iteration", "model", "ema", "ema_num_updates", "optimizer", "grad_scaler", "rng", "train_config")
#: the kinds of model file, each tagged ``meddiff3d.<kind>/1`` (:func:`kind_tag`)
MODEL_KINDS = ("codec", "latent_diffusion", "segmentation_diffusion", "seg_baseline", "image_diffusion")
#: tags of files written before the one scheme (the shipped demo weights among them) -> their kind
LEGACY_KIND_TAGS = {"latent_diffusion": "latent_diffusion", "segmentation_diffusion": "segmentation_diffusion",
                    "meddiff3d.brats_seg_baseline/1": "seg_baseline"}
#: how each model kind is named in messages
KIND_NOUNS = {"codec": "a codec", "latent_diffusion": "a latent diffusion model",
              "segmentation_diffusion": "a segmentation diffusion model",
              "seg_baseline": "a segmentation baseline model", "image_diffusion": "an image diffusion model"}
_LIST_LIMIT = 8
#: the temporary name :func:`meddiff3d.utils.io.atomic_path` writes to (tempfile.mkstemp's 8 random characters)
_PARTIAL_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(?P<suffix>(\.[^.]+)*)")
#: pickle opcodes that name or call a Python global (code or arbitrary objects)
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"}
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
    """``torch.save`` through a temporary file renamed into place: a killed writer never leaves a partial file under
    ``path`` (only its temporary ``.NAME.XXXXXXXX.tmp.pt``, which :func:`remove_partial_files` deletes)."""
    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)
    return Path(path)


def remove_partial_files(folder: str | os.PathLike, *subfolders: str) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``folder`` and its ``subfolders`` (not
    recursive); returns them. Only names made by :func:`meddiff3d.utils.io.atomic_path` are touched:
    ``.NAME.XXXXXXXX.tmp<suffix of NAME>``."""
    removed = []
    for where in (Path(folder), *(Path(folder) / sub for sub in subfolders)):
        for path in sorted(where.glob(".*.tmp*")) if where.is_dir() else []:
            found = _PARTIAL_NAME.fullmatch(path.name)
            if found and found["name"].endswith(found["suffix"]) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def read_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", what: str = "checkpoint", *,
              kind: str | None = None, formats: tuple[str, ...] | None = FILE_FORMATS) -> Any:
    """The one reader of torch files: ``torch.load(weights_only=True)`` with one-line :class:`InputError` s naming the
    file as ``what``: missing, a directory, empty, truncated, not a torch file, or holding Python code or objects
    other than tensors (refused in our words: torch's own message suggests loading unsafely).

    ``formats``: the ``format`` tags accepted (default: the meddiff3d checkpoint, inference and codec files; ``None``:
    any content, returned as read, e.g. a foreign state dict). ``kind``: the model kind the file must hold
    (:func:`kind_of`), e.g. ``"codec"``.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, expected a file")
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist")
    try:
        with warnings.catch_warnings():  # "Detected pickle protocol 4 ...": a foreign pickle, refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise InputError(f"{what} {path} cannot be read ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 - unpickling and archive errors come in many types
        raise InputError(f"{what} {path} {_unreadable(path, err)}") from None
    if formats is not None and not (isinstance(data, dict) and data.get("format") in formats):
        expected = KIND_NOUNS[kind] if kind else f"one of {', '.join(formats)}"
        if not isinstance(data, dict):
            found = f"it holds a {type(data).__name__}"
        elif "format" not in data:
            found = "a dict without a 'format' tag, e.g. a bare state dict"
        else:
            found = f"format {data['format']!r}"
        raise InputError(f"{what} {path} is not a meddiff3d file ({found}; expected {expected})")
    if formats is not None and not isinstance(data.get("meta", {}), Mapping):
        raise InputError(f"{what} {path} is damaged: its meta is a {type(data['meta']).__name__}, not a mapping")
    if kind is not None and kind_of(data) != kind:
        raise InputError(f"{what} {path} is {_holding(data)}, not {KIND_NOUNS[kind]}")
    return data


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint (``last.pt``, ``iter_*.pt``) holding every entry a resume needs, else an
    :class:`InputError` naming the file."""
    data = read_file(path, map_location, formats=(CHECKPOINT_FORMAT,))
    missing = [k for k in RESUME_KEYS if k not in data]
    if missing:
        raise InputError(f"checkpoint {path} is damaged or incomplete: no {', '.join(missing)}")
    return data


def _unreadable(path: Path, err: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, in words (the file is inspected, never unpickled)."""
    size = path.stat().st_size
    if size == 0:
        return "cannot be read: the file is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(12)
    archive, pickled = zipfile.is_zipfile(path), head.startswith(b"\x80")  # torch's zip / a pickle (protocol 2+)
    if isinstance(err, pickle.UnpicklingError) and (archive or pickled):
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found or archive or _pickle_has_code(path):
            return ("holds Python code or objects other than tensors ("
                    + (f"{found.group(1)}; " if found else "") + "refused: meddiff3d reads weights only)")
        return "cannot be read: a plain Python pickle, not a torch weights file (refused: meddiff3d reads weights only)"
    if archive:
        return "cannot be read: a zip archive that is not a torch file"
    if head.startswith(b"PK") or pickled:
        return f"cannot be read: a truncated or corrupted torch file ({size} bytes; an interrupted copy or write?)"
    return f"cannot be read: not a torch file (it starts with {head!r})"


def _pickle_has_code(path: Path) -> bool:
    """Whether a raw pickle names a global or calls one (scanned with :mod:`pickletools`, nothing is executed)."""
    try:
        with open(path, "rb") as f:
            return any(op.name in _CODE_OPCODES for op, _, _ in pickletools.genops(f))
    except Exception:  # noqa: BLE001 - a broken pickle: no code found before the break
        return False


def _holding(data: Any) -> str:
    """What a file holds, for "X is <this>, not a codec"."""
    found = kind_of(data)
    if found is not None:
        return f"{KIND_NOUNS[found]} file"
    if not isinstance(data, Mapping):
        return f"a {type(data).__name__}, not a model file"
    meta = data.get("meta")
    tag = meta.get("kind") if isinstance(meta, Mapping) else None
    return f"a {data.get('format')} file of no known model kind (meta kind {tag!r})"


def kind_tag(kind: str, version: int = 1) -> str:
    """The tag of a model kind in the one naming scheme: ``meddiff3d.<kind>/<version>``."""
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {', '.join(MODEL_KINDS)}")
    return f"meddiff3d.{kind}/{version}"


def kind_of(data: Any) -> str | None:
    """The model kind of a file's content (:func:`read_file`): ``"codec"`` by its format, else from ``meta["kind"]``
    (current or legacy tag); ``None`` when it names none."""
    if not isinstance(data, Mapping):
        return None
    if data.get("format") == CODEC_FORMAT:
        return "codec"
    meta = data.get("meta")
    tag = str(meta.get("kind") if isinstance(meta, Mapping) else None)
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


def sync_inference(checkpoint: Mapping, path: str | os.PathLike) -> bool:
    """Rewrite the inference export ``path`` from a training checkpoint's payload unless it already holds the same
    iteration (missing or unreadable: rewritten); returns whether it was rewritten.

    The trainer writes ``last.pt`` first, then ``inference.pt``: a kill between the two leaves ``inference.pt`` one
    checkpoint behind, and on resume ``last.pt`` wins (its EMA weights are exported again).
    """
    try:
        current = read_file(path, what="inference export", formats=(INFERENCE_FORMAT,))
    except InputError:
        current = None
    if current is not None and current.get("iteration") == int(checkpoint["iteration"]):
        return False
    export_inference(checkpoint, path)
    return True


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
        raise InputError(f"{source} has no {weights!r} entry (it holds: {', '.join(sorted(map(str, data)))})")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    state = data[weights]
    if not (isinstance(state, Mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())):
        raise InputError(f"{source}: its {weights!r} entry is not a state dict (parameter name -> tensor)")
    state = _strip_ddp_prefix(state)
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
    class_path, args = spec["class"], spec.get("args") or {}
    if not isinstance(args, Mapping):
        raise InputError(f"network class {class_path!r}: its args must be a mapping, got {type(args).__name__}")
    args = dict(args)
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
    except (TypeError, ValueError) as err:  # MONAI checks argument combinations with ValueError
        raise InputError(f"network class {class_path!r} rejects the arguments {sorted(args)}: {err}") from err
