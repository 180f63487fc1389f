"""Atomic output writing: NIfTI volumes, JSON, PNG previews.

Every writer goes through :func:`atomic_path`: it writes a temporary file in the destination folder and renames it
into place, so a killed process never leaves a partial output behind.

PNG previews are drawn with Pillow (a core dependency) straight from numpy: three centre slices side by side, an
optional overlay, no display needed. matplotlib is no dependency (MONAI's ``matshow3d`` needs it), and MONAI's
``plot_2d_or_3d_image`` writes to TensorBoard, not to a PNG file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from meddiff3d.errors import InputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on failure delete it.

    ``suffix`` defaults to the full suffix of ``path`` (``.nii.gz`` included), so writers that infer the format from
    the file name keep working.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: str | os.PathLike, *, missing: str, invalid: str, error: type[Exception] = InputError) -> Any:
    """The parsed JSON file at ``path``; a missing file, or one that is not JSON, raises ``error`` with the message
    ``missing`` / ``invalid``, format strings naming the file as ``{path}`` (and ``invalid`` the parse error as
    ``{err}``), e.g. ``missing="datalist {path}: file not found"``."""
    path = Path(path)
    if not path.is_file():
        raise error(missing.format(path=path))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise error(invalid.format(path=path, err=err)) from err


def save_json(obj, path: str | os.PathLike, indent: int = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")
    return Path(path)


def save_nifti(array, affine, path: str | os.PathLike, dtype=np.float32, header_extra: dict | None = None) -> Path:
    """Write a 3D (or 4D, channel last) array as NIfTI with ``affine`` as both qform and sform (code 1, scanner).

    Spacing in the header is taken from the affine so nibabel, ITK and Slicer agree on the geometry.
    """
    import nibabel as nib

    data = np.asarray(array)
    if data.dtype != dtype:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if header_extra and "descrip" in header_extra:
        img.header["descrip"] = str(header_extra["descrip"])[:79].encode()
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_preview_png(volume, path: str | os.PathLike, overlay=None, title: str | None = None) -> Path:
    """Save the three orthogonal centre slices (axial, coronal, sagittal) of a 3D RAS volume side by side as PNG.

    ``overlay`` (same shape, e.g. a label or anomaly map) is drawn in colour on top where it is non-zero.
    Uses Pillow only (no display needed). Slices are shown in radiological-free neurological view: superior up.
    """
    from PIL import Image, ImageDraw

    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 4:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"preview needs a 3D volume, got shape {vol.shape}")
    finite = vol[np.isfinite(vol)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    scale = max(float(hi - lo), 1e-8)
    cx, cy, cz = (s // 2 for s in vol.shape)
    # RAS array axes: x = left->right, y = posterior->anterior, z = inferior->superior; put superior/anterior up.
    slices = [vol[:, :, cz].T[::-1], vol[:, cy, :].T[::-1], vol[cx, :, :].T[::-1]]
    over = None
    if overlay is not None:
        ov = np.asarray(overlay, dtype=np.float32)
        if ov.ndim == 4:
            ov = ov[0]
        over = [ov[:, :, cz].T[::-1], ov[:, cy, :].T[::-1], ov[cx, :, :].T[::-1]]
    panels = []
    for i, sl in enumerate(slices):
        grey = np.clip((sl - lo) / scale, 0, 1)
        rgb = np.stack([grey] * 3, axis=-1)
        if over is not None:
            mask = over[i] > 0
            rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([1.0, 0.2, 0.1])
        panels.append((rgb * 255).astype(np.uint8))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 2), (0, 0))) for p in panels]
    canvas = Image.fromarray(np.concatenate(padded, axis=1))
    if title:
        ImageDraw.Draw(canvas).text((2, 2), title, fill=(255, 255, 0))
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
