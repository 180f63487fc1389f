"""The one model loader: any meddiff3d model file -> a ready network with its meta, each file read once.

``load_model(path, kind)`` reads the file weights-only (:func:`meddiff3d.engine.checkpoint.read_file`), checks that
it holds a model of ``kind`` (one of :data:`~meddiff3d.engine.checkpoint.MODEL_KINDS`: ``codec``,
``latent_diffusion``, ``segmentation_diffusion``, ``seg_baseline``, ``image_diffusion``), builds the network its
meta describes and loads the weights (EMA by default) after checking they fit. Codec files become a
:class:`~meddiff3d.models.codec.LatentCodec` (autoencoder + the latent scale/shift saved with it) and carry their
content fingerprint, so a diffusion model can be paired with its codec without reading the codec again.

It lives at the ``models`` layer, not in ``engine``: building a codec needs :class:`LatentCodec`, and the engine
imports nothing above itself. The engine keeps the file formats, the weights-only reader and the architecture check.

Networks other than codecs are built on the ``meta`` device and take the file's tensors (``assign=True``), so their
weights exist once in memory; with ``dtype`` they are readied for :class:`~meddiff3d.engine.precision.Autocast`
(:func:`~meddiff3d.engine.precision.prepare_for_inference`: bf16-stored weights, channels-last).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from meddiff3d.engine.checkpoint import MODEL_KINDS, build_network, file_sha256, load_weights, read_file
from meddiff3d.engine.precision import prepare_for_inference
from meddiff3d.errors import InputError
from meddiff3d.models.codec import LatentCodec, codec_fingerprint

__all__ = ["LoadedModel", "load_model", "KIND_NAMES"]

#: how the file of each kind is named in messages (what it must hold: :data:`~meddiff3d.engine.checkpoint.KIND_NOUNS`)
KIND_NAMES = {"codec": "codec file", "latent_diffusion": "diffusion model file",
              "segmentation_diffusion": "segmentation diffusion model", "seg_baseline": "segmentation baseline model",
              "image_diffusion": "image diffusion model file"}

#: the meta entries (mappings) that inference reads from each kind's file: a file without them is refused on loading
META_ENTRIES = {"codec": (), "latent_diffusion": ("schedule", "conditioning", "latent", "image", "codec"),
                "segmentation_diffusion": ("schedule", "coordinates", "image"), "seg_baseline": ("image", "inference"),
                "image_diffusion": ("schedule", "image")}


@dataclass
class LoadedModel:
    """A loaded model file: the network (a :class:`LatentCodec` for codecs) in eval mode, its meta and provenance."""

    network: torch.nn.Module
    meta: dict
    path: Path
    kind: str
    iteration: int | None = None
    #: codecs only: :func:`~meddiff3d.models.codec.codec_fingerprint` of the file's content
    fingerprint: str | None = None

    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the file's bytes (for sidecars; computed once, on first use)."""
        return file_sha256(self.path)

    def provenance(self) -> dict[str, Any]:
        """``{"file", "sha256"}`` for sidecars and calibration files."""
        return {"file": str(self.path), "sha256": self.sha256}


def load_model(path: str | os.PathLike, kind: str, *, device: torch.device | str = "cpu", weights: str = "ema",
               dtype: torch.dtype | None = None, **codec_options: Any) -> LoadedModel:
    """Load the ``kind`` model in ``path`` onto ``device`` (see the module docstring).

    Args:
        weights: ``"ema"`` (inference exports and checkpoints) or ``"model"`` (raw weights, checkpoints only);
            codecs have one set.
        dtype: readies the network for autocast to it (``None``: float32, as trained).
        codec_options: codecs only, inference settings of :class:`LatentCodec` (``decode_tile``, ``encode_tile``,
            ``overlap``, ``split``, ``amp_dtype``, ``channels_last``); never the latent scale/shift.

    Raises :class:`InputError` naming the file: missing, unreadable, not a meddiff3d file, another kind of model,
    an unknown or untrusted network class, weights that do not fit the network.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; valid: {', '.join(MODEL_KINDS)}")
    what = KIND_NAMES[kind]
    path = Path(path)
    data = read_file(path, "cpu", what=what, kind=kind)
    meta = dict(data.get("meta") or {})
    missing = [key for key in META_ENTRIES[kind] if not isinstance(meta.get(key), dict)]
    if missing:
        raise InputError(f"{what} {path} is damaged or incomplete: its meta has no {', '.join(missing)} entry")
    if kind != "codec" and codec_options:
        raise ValueError(f"codec options {sorted(codec_options)} given for a {kind} model")
    try:
        if kind == "codec":
            network = _codec(data, meta, path, codec_options)
            fingerprint = codec_fingerprint(data["weights"], meta)
        else:
            network = build_network(meta, device="meta")  # the weights are the file's tensors: held once
            load_weights(data, network, weights, source=f"{what} {path}", assign=True)
            fingerprint = None
    except InputError as err:
        raise err if str(path) in str(err) else InputError(f"{what} {path}: {err}") from err
    iteration = data.get("iteration")
    del data
    network = network.to(device).eval()
    if kind != "codec":
        network = prepare_for_inference(network, dtype)
    return LoadedModel(network, meta, path, kind, iteration, fingerprint)


def _codec(data: dict, meta: dict, path: Path, options: dict[str, Any]) -> LatentCodec:
    codec = LatentCodec(build_network(meta), **options)
    load_weights(data, codec, "weights", source=f"codec file {path}")
    return codec
