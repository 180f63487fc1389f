"""The one random patch sampler of the training recipes: same box from every key, corner recorded, resumable.

A network trained on patches with coordinate channels (:class:`meddiff3d.diffusion.CoordinateChannels`) must see, for
each patch, the coordinates of its true position in the whole (padded) volume. :class:`RandPatchd` crops the same
random box from every key and records the box's low corner, in voxels of the whole volume, under ``offset_key``
(default ``"patch_offset"``, an int64 ``(D,)`` tensor that collates to ``(B, D)``) -- the keyword
:class:`meddiff3d.diffusion.AppendCoordinates` reads.

Foreground bias: with probability ``foreground_prob`` the patch is centred on a voxel drawn uniformly from the
foreground of ``label_key`` (channel 0, i.e. WT for BraTS region masks), shifted as little as needed to lie inside the
volume; otherwise (and for volumes without foreground) its corner is uniform over all positions that fit. Cropping
uses MONAI's ``SpatialCrop``, so MetaTensors keep a correct affine.

Randomness: every draw comes from the global torch RNG, which the training engine seeds and restores on resume
(:func:`meddiff3d.engine.checkpoint.capture_rng_state`). With ``num_workers=0`` the data loads in the main process
between the optimiser steps, so a killed and resumed run cuts the patches of the uninterrupted run. (MONAI
``Randomizable`` crops keep a private ``RandomState`` that no checkpoint holds.) With workers, each per-epoch loader
seeds its workers deterministically and a resume is exact again from the next data epoch. Without foreground bias
the draws are one ``torch.randint`` per axis.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTrait, SpatialCrop

from meddiff3d.errors import InputError

__all__ = ["RandPatchd", "patch_corner"]


def patch_corner(shape: Sequence[int], patch_size: Sequence[int], foreground: np.ndarray | torch.Tensor | None = None,
                 foreground_prob: float = 0.0) -> np.ndarray:
    """Low corner ``(D,)`` of a random patch of ``patch_size`` inside ``shape`` (global torch RNG; module docstring)."""
    shape, size = np.asarray(shape, dtype=np.int64), np.asarray(patch_size, dtype=np.int64)
    if size.shape != shape.shape or np.any(size > shape) or np.any(size < 1):
        raise InputError(f"patch size {size.tolist()} does not fit in a volume of shape {shape.tolist()} "
                         "(a side is larger than the volume, or below 1)")
    highest = shape - size
    if foreground is not None and foreground_prob > 0 and float(torch.rand(())) < foreground_prob:
        voxels = torch.nonzero(torch.as_tensor(foreground) > 0)  # (N, D)
        if len(voxels):
            centre = voxels[int(torch.randint(0, len(voxels), ()))].numpy()
            return np.clip(centre - size // 2, 0, highest)
    return np.array([int(torch.randint(0, int(h) + 1, ())) for h in highest], dtype=np.int64)


class RandPatchd(MapTransform, RandomizableTrait):
    """Crop the same random ``patch_size`` box from every key and record its corner under ``offset_key``.

    Args:
        keys: keys to crop (channel-first tensors of one spatial shape), e.g. ``["image", "label"]``.
        patch_size: spatial size of the patch.
        label_key: key whose channel 0 is the foreground for the biased draws (``None``: never biased).
        foreground_prob: probability of centring the patch on a foreground voxel.
        offset_key: where the corner goes (int64 ``(D,)``).

    A ``RandomizableTrait`` (so ``CacheDataset`` caches only what comes before it) but not a MONAI ``Randomizable``:
    it has no private random state; seed it with ``torch.manual_seed``.
    """

    def __init__(self, keys, patch_size: Sequence[int], label_key: str | None = "label", foreground_prob: float = 0.0,
                 offset_key: str = "patch_offset", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= float(foreground_prob) <= 1.0:
            raise InputError(f"foreground_prob must be in [0, 1], got {foreground_prob}")
        self.patch_size = tuple(int(s) for s in patch_size)
        self.label_key, self.foreground_prob, self.offset_key = label_key, float(foreground_prob), offset_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        shape = tuple(d[keys[0]].shape[1:])
        for key in keys[1:]:
            if tuple(d[key].shape[1:]) != shape:
                raise InputError(f"item {d.get('id', '?')}: {key} has shape {tuple(d[key].shape[1:])}, "
                                 f"{keys[0]} {shape}: patches need one grid")
        foreground = None
        if self.label_key is not None and self.label_key in d and self.foreground_prob > 0:
            foreground = d[self.label_key][0]
        corner = patch_corner(shape, self.patch_size, foreground, self.foreground_prob)
        crop = SpatialCrop(roi_start=corner.tolist(), roi_end=(corner + np.asarray(self.patch_size)).tolist())
        for key in keys:
            d[key] = crop(d[key])
        d[self.offset_key] = torch.as_tensor(corner, dtype=torch.int64)
        return d
