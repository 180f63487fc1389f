"""Axial slices of a 3D T1 datalist as a 2D datalist: the training data of the 2D image diffusion model.

:func:`slice_datalist` takes, for every volume of every section (the 3D datalist's split is kept: slices of one subject
stay in one section), the volume in RAS order (nibabel's closest canonical), ``count`` axial slices evenly over the
middle of its brain (``band``: fractions of the inferior-superior extent of the voxels above 10 % of the volume's
99.5th percentile), each shown radiologically (anterior at the top, the patient's right on the image's left), padded to
a square, resampled to ``size`` (bilinear, antialiased), scaled by the volume's 99.5th percentile to [0, 1] and written
as a 16-bit PNG. Each slice's class is its level: the lower, middle or upper third of the band (:data:`LEVELS`).

    OUT/images/<subject>_s<k>.png
    OUT/datalist.json   {"spatial_dims": 2, "modalities": ["t1"], "classes": [...], "pixel_spacing_mm": [..],
                         "source": {...}, "training": [{"id", "image", "class", "subject", "level"}], ...}

``scripts/make_slice_datalist.py`` is its command line; the bundle medical_2d_ddpm's data config calls it on the
synthetic cohort.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from tqdm.auto import tqdm

from meddiff3d.checks import check_int, check_output_dir, check_sizes
from meddiff3d.data.datalist import SECTIONS, check_datalist, write_checked_datalist
from meddiff3d.data.images import read_image
from meddiff3d.data.images2d import resample
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_image_png

__all__ = ["LEVELS", "slice_datalist", "axial_slices", "ras_volume", "radiological"]

#: the class of a slice: its third of the band
LEVELS = ("inferior", "middle", "superior")


def axial_slices(volume: np.ndarray, count: int, band: tuple[float, float]) -> list[tuple[int, float]]:
    """``count`` axial indices evenly over ``band`` of the brain's inferior-superior extent, with their position in
    the band (0 = its bottom, 1 = its top)."""
    tissue = volume > 0.1 * np.percentile(volume, 99.5)
    rows = np.nonzero(tissue.any(axis=(0, 1)))[0]
    if rows.size < 2:
        raise InputError("no brain found (no voxel above 10 % of the 99.5th percentile)")
    low, high = rows[0] + band[0] * (rows[-1] - rows[0]), rows[0] + band[1] * (rows[-1] - rows[0])
    positions = np.linspace(0, 1, count) if count > 1 else np.array([0.5])
    return [(int(round(low + p * (high - low))), float(p)) for p in positions]


def ras_volume(path: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The volume in ``path`` (any format meddiff3d reads) in RAS voxel order, and its voxel size; refuses voxels
    that are not square in the axial plane (the slices would be distorted)."""
    array, affine = read_image(path)
    axes = io_orientation(affine)  # per array axis: (its RAS axis, flip)
    volume = apply_orientation(np.asarray(array, dtype=np.float32), ornt_transform(axes, axcodes2ornt("RAS")))
    sizes = np.linalg.norm(affine[:3, :3], axis=0)
    zooms = tuple(float(sizes[int(np.nonzero(axes[:, 0] == ras)[0][0])]) for ras in range(3))
    if abs(zooms[0] - zooms[1]) > 1e-3 * max(zooms[:2]):
        raise InputError(f"{path}: voxels of {zooms[0]:g} x {zooms[1]:g} mm in the axial plane; the slices need "
                         f"square pixels (resample the volume first)")
    return volume, zooms


def radiological(slice_ras: np.ndarray) -> np.ndarray:
    """An axial RAS slice ``(X, Y)`` as displayed radiologically: rows anterior -> posterior, columns right -> left."""
    return slice_ras[::-1, ::-1].T


def square(image: np.ndarray) -> np.ndarray:
    side = max(image.shape)
    out = np.zeros((side, side), image.dtype)
    r, c = (side - image.shape[0]) // 2, (side - image.shape[1]) // 2
    out[r:r + image.shape[0], c:c + image.shape[1]] = image
    return out


def slice_datalist(datalist: Any, out: Any, size: Sequence[int] = (64, 64), count: int = 12,
                   band: Sequence[float] = (0.3, 0.75), progress: bool = True) -> Path:
    """Write the slices of ``datalist`` and their 2D datalist to ``out`` (module docstring); returns the datalist's
    path. Every slice is made in memory first, so that a volume without a brain stops the script before anything is
    written."""
    band = tuple(float(b) for b in band)
    if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
        raise InputError(f"band must be two fractions 0 <= low < high <= 1, got {list(band)}")
    size = tuple(check_sizes("slice size", list(size), ndim=2))
    count = check_int("slices per volume", count, 1, 10_000)
    if min(size) < 8:
        raise InputError(f"slice size must be at least 8x8, got {list(size)}")
    sections = check_datalist(datalist, check_images="header", modalities=1)
    out = check_output_dir(out, "slice output folder")
    written: dict[str, list[dict]] = {}
    slices: dict[str, np.ndarray] = {}
    spacing = None
    for section in SECTIONS:
        written[section] = []
        for item in tqdm(sections.get(section) or [], desc=f"{section} volumes", disable=not progress):
            volume, zooms = ras_volume(item["image"])
            scale = float(np.percentile(volume, 99.5)) or 1.0
            try:
                levels = axial_slices(volume, count, band)
            except InputError as err:
                raise InputError(f"{item['image']}: {err}") from None
            for k, (z, position) in enumerate(levels):
                image = square(radiological(volume[:, :, z]))
                small = resample(torch.from_numpy(np.ascontiguousarray(image))[None, None], size)
                name = f"{item['id']}_s{k:02d}"
                slices[name] = np.clip(small[0, 0].numpy() / scale, 0, 1)
                level = LEVELS[min(int(position * len(LEVELS)), len(LEVELS) - 1)]
                written[section].append({"id": name, "image": str(out / "images" / f"{name}.png"), "class": level,
                                         "subject": item["id"], "level": round(position, 3), "z_index": z})
                spacing = spacing or [max(image.shape) * zooms[0] / s for s in size]
    for name, image in tqdm(slices.items(), desc="writing slices", disable=not progress):
        save_image_png(image, out / "images" / f"{name}.png", bits=16)
    written = {name: items for name, items in written.items() if items}
    return write_checked_datalist(out / "datalist.json", written, name="axial slices", spatial_dims=2,
                                  modalities=["t1"],
                                  classes=list(LEVELS), pixel_spacing_mm=spacing,
                                  source={"datalist": str(datalist), "slices_per_volume": count, "band": list(band),
                                          "size": list(size),
                                          "orientation": "radiological (anterior up, right on the left)"})
