"""Latent training data: a datalist's volumes encoded once by a codec, cached under the run directory.

``encode_latents(codec_path, datalist, cache_dir, covariates=[...])`` loads each training volume with
:func:`~meddiff3d.data.transforms.t1_brain_transforms` (RAS, the codec's spacing, percentile scaling, padded/cropped to
the codec's image shape), encodes it to a normalised latent and collects its covariates (in the order given). The
result is written atomically to ``CACHE_DIR/latents.pt`` and reused by later runs when its key matches: the codec's
content fingerprint, the datalist section (ids, files with their sizes and modification times, covariates), the
covariate names and the geometry. Anything else (a retrained codec, an edited datalist) re-encodes.

Cache file (``weights_only`` readable)::

    {"format": "meddiff3d.latents/1", "key": {...}, "ids": [str], "latents": (N, C, d, h, w) float32,
     "covariates": (N, n) float32, "image": {"shape", "spacing", "affine", "orientation"}}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff3d.data.datalist import load_datalist, read_datalist
from meddiff3d.data.transforms import t1_brain_transforms
from meddiff3d.engine.checkpoint import read_file, remove_partial_files
from meddiff3d.errors import InputError
from meddiff3d.data.images import canonical_affine
from meddiff3d.models.loading import LoadedModel, load_model
from meddiff3d.utils.io import atomic_path

logger = logging.getLogger("meddiff3d.pipelines")

LATENTS_FORMAT = "meddiff3d.latents/1"


@dataclass
class LatentSet:
    """Encoded training data: ``latents`` ``(N, C, *latent_shape)``, ``covariates`` ``(N, n)``, their ``ids``."""

    latents: torch.Tensor
    covariates: torch.Tensor
    ids: list[str]
    image: dict[str, Any]  # shape, spacing, affine (RAS), orientation
    covariate_names: list[str]
    covariate_scaling: dict[str, Any]
    path: Path
    reused: bool

    def items(self, conditioning) -> list[dict[str, torch.Tensor]]:
        """Training items ``{"image": z, **conditioning(covariates)}`` for the trainer (one dict per volume)."""
        return [{"image": z, **{k: v[0] for k, v in conditioning(c[None]).items()}}
                for z, c in zip(self.latents, self.covariates)]


def codec_geometry(codec_meta: dict, spacing=None, shape=None) -> tuple[list[float], list[int]]:
    """The image spacing and shape a codec works at: its meta's ``image`` entry, else the arguments (which must agree
    with the meta when both are given)."""
    image = codec_meta.get("image") or {}
    out = []
    for name, given, cast in (("spacing", spacing, float), ("shape", shape, int)):
        saved = image.get(name)
        if saved is not None and given is not None and [cast(v) for v in saved] != [cast(v) for v in given]:
            raise InputError(f"image {name} {list(given)} differs from the codec's {list(saved)}")
        value = saved if saved is not None else given
        if value is None:
            raise InputError(f"the codec meta has no image {name}; pass {name}= explicitly")
        out.append([cast(v) for v in value])
    return out[0], out[1]


def _source_key(items: list[dict], names: Sequence[str]) -> list:
    key = []
    for item in items:
        files = item["image"] if isinstance(item["image"], list) else [item["image"]]
        stats = [(str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        key.append([item.get("id"), stats, [item.get("covariates", {}).get(n) for n in names]])
    return key


def encode_latents(codec: str | os.PathLike | LoadedModel, datalist: str | os.PathLike, cache_dir: str | os.PathLike, *,
                   covariates: Sequence[str], section: str = "training", spacing: Sequence[float] | None = None,
                   shape: Sequence[int] | None = None, device: str | torch.device = "cpu",
                   encode_tile: Sequence[int] | None = None, progress: bool = True) -> LatentSet:
    """Encode (or reuse the cached encoding of) a datalist section; see the module docstring. ``codec`` is a codec
    file or one already loaded (:func:`~meddiff3d.models.loading.load_model`; then ``encode_tile`` is its own)."""
    cache = Path(cache_dir) / "latents.pt"
    names = list(covariates)
    if not isinstance(codec, LoadedModel):
        codec = load_model(codec, "codec", encode_tile=encode_tile)
    fingerprint, codec_meta, codec = codec.fingerprint, codec.meta, codec.network
    spacing, shape = codec_geometry(codec_meta, spacing, shape)
    codec.latent_shape(shape)  # raises if the shape does not divide
    items = load_datalist(datalist, section, covariates=None, check_images="header")
    missing = [it.get("id") for it in items if any(n not in (it.get("covariates") or {}) for n in names)]
    if names and missing:
        raise InputError(f"datalist {datalist}: items {missing[:5]} lack covariates {names}")
    key = {"codec": fingerprint, "section": section, "covariates": names,
           "spacing": spacing, "shape": shape, "items": _source_key(items, names)}
    key = json.loads(json.dumps(key))
    scaling = {n: (read_datalist(datalist).get("covariates") or {}).get(n, {}) for n in names}

    removed = remove_partial_files(cache.parent)
    if removed:
        logger.info("removed %d partial file(s) of an interrupted encoding in %s", len(removed), cache.parent)
    if cache.exists():
        try:
            data = read_file(cache, what="latent cache", formats=(LATENTS_FORMAT,))
        except InputError as err:  # an unreadable, foreign or refused cache is re-made
            logger.warning("%s; encoding again", err)
            data = {}
        if data.get("key") == key:
            logger.info("reusing cached latents %s (%d volumes)", cache, len(data["ids"]))
            return LatentSet(data["latents"], data["covariates"], list(data["ids"]), data["image"], names, scaling,
                             cache, True)

    transform = t1_brain_transforms(spacing, shape, train=False, covariates=names or None)
    codec = codec.to(device)
    latents, covs, affines = [], [], []
    iterator = items
    if progress:
        from tqdm import tqdm

        iterator = tqdm(items, desc="encoding latents", unit="volume")
    for item in iterator:
        data = transform(item)
        image = data["image"]
        affines.append(np.asarray(image.affine, dtype=np.float64))
        latents.append(codec.encode(image.as_tensor()[None].to(device)).cpu()[0])
        covs.append(data["covariates"] if names else torch.zeros(0))
    affine = affines[0]
    if any(np.abs(a - affine).max() > 1e-3 for a in affines):
        logger.warning("training volumes lie on different grids; generated volumes get the canonical MNI-like affine")
        affine = canonical_affine(shape, spacing)
    image_meta = {"shape": shape, "spacing": spacing, "affine": affine.tolist(), "orientation": "RAS",
                  "normalisation": "percentile 0-99.5 -> [0, 1] (t1_brain_transforms)"}
    payload = {"format": LATENTS_FORMAT, "key": key, "ids": [str(it.get("id")) for it in items],
               "latents": torch.stack(latents).float(), "covariates": torch.stack(covs).float(), "image": image_meta}
    with atomic_path(cache) as tmp:
        torch.save(payload, tmp)
    logger.info("encoded %d volumes to %s", len(items), cache)
    return LatentSet(payload["latents"], payload["covariates"], payload["ids"], image_meta, names, scaling, cache,
                     False)
