"""Atomic output writing: NIfTI volumes (scalar and per-voxel vector), 2D images (NIfTI, grayscale PNG), JSON, PNG
previews.

Every writer goes through :func:`atomic_path`: it writes a temporary file in the destination folder and renames it
into place, so a killed process never leaves a partial output behind.

Multi-channel maps (e.g. a probability per tumour region) are written by :func:`save_vector_nifti` as one NIfTI
*vector* image: shape ``(X, Y, Z, 1, C)``, ``dim[5] = C``, intent ``NIFTI_INTENT_VECTOR`` (1007), the channel names
in ``intent_name``. Why one vector file rather than ``(X, Y, Z, C)`` or one file per channel: the 4th NIfTI axis is
time, so readers show a ``(X, Y, Z, C)`` file as a C-frame movie (Slicer as a sequence, ITK as a 4D image); the 5th
axis is the one the standard reserves for values per voxel, and ITK / SimpleITK / 3D Slicer read it as a 3D image of
C-component pixels (``sitk.ReadImage`` -> size ``(X, Y, Z)``, ``GetNumberOfComponentsPerPixel() == C``), nibabel as
an array ``(X, Y, Z, 1, C)``. One file per channel would triple the files of every case and split what belongs
together; a viewer that wants one channel takes it out of the vector (Slicer: "Vector to Scalar Volume", MONAI Label:
meddiff3d.label sends one region). :func:`read_channels` reads both this layout and the older channel-last one.

PNG previews (:func:`save_preview_png`) are drawn with Pillow (a core dependency) straight from numpy: three
orthogonal centre slices in the patient's RAS axes, at least 256 px a view, orientation letters on every view, the
display convention written on the image, an optional overlay coloured per label value with a legend, and free-text
notes (e.g. the threshold that made a mask). matplotlib is no dependency (MONAI's ``matshow3d`` needs it), and MONAI's
``plot_2d_or_3d_image`` writes to TensorBoard, not to a PNG file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from meddiff3d.errors import InputError

__all__ = ["atomic_path", "read_json", "save_json", "save_nifti", "save_vector_nifti", "read_channels",
           "save_preview_png", "save_image_nifti", "save_image_png", "CONVENTIONS", "PREVIEW_MIN_VIEW"]

#: where the preview draws the patient's right, per display convention
CONVENTIONS = {"radiological": "patient's right on image left (as 3D Slicer and ITK-SNAP show it)",
               "neurological": "patient's left on image left"}
#: smallest side of a preview view, in pixels
PREVIEW_MIN_VIEW = 256
#: PNG text key holding the preview's layout (views, convention, legend) as JSON
PREVIEW_INFO_KEY = "meddiff3d-preview"


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


def json_safe(obj):
    """``obj`` with NaN / Inf floats replaced by None, through dicts, lists and tuples (JSON has no NaN)."""
    if isinstance(obj, Mapping):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def save_json(obj, path: str | os.PathLike, indent: int = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=False) + "\n")
    return Path(path)


def _nifti_image(data: np.ndarray, affine, descrip: str | None):
    import nibabel as nib

    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    if descrip:
        img.header["descrip"] = str(descrip)[:79].encode()
    return img


def _save_image(img, path: str | os.PathLike) -> Path:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def save_nifti(array, affine, path: str | os.PathLike, dtype=np.float32, header_extra: dict | None = None) -> Path:
    """Write a 3D (or 4D) array as NIfTI with ``affine`` as both qform and sform (code 1, scanner).

    Spacing in the header is taken from the affine so nibabel, ITK and Slicer agree on the geometry. A 4th axis is
    NIfTI's time axis; write values per voxel (channels) with :func:`save_vector_nifti` instead.
    """
    data = np.asarray(array)
    if data.dtype != dtype:
        data = data.astype(dtype)
    img = _nifti_image(data, affine, (header_extra or {}).get("descrip"))
    img.header.set_xyzt_units("mm", "sec")
    return _save_image(img, path)


def save_image_nifti(image, spacing: Sequence[float], path: str | os.PathLike, dtype=np.float32) -> Path:
    """A 2D image ``(rows, columns)`` with its pixel spacing (mm, rows then columns) as a 2D NIfTI: data
    ``(columns, rows)`` and the affine ``diag(-column spacing, -row spacing, 1)`` -- columns towards patient left,
    rows towards posterior, so that 3D Slicer and ITK-SNAP (axial view) show it as the PNG shows it, and a
    radiologically displayed slice (meddiff3d's) has its anatomical orientation. :func:`read_image_2d
    <meddiff3d.data.images2d.read_image_2d>` reads it back as the same image."""
    data = np.asarray(image)
    if data.ndim != 2:
        raise ValueError(f"save_image_nifti needs a 2D image (rows, columns), got shape {data.shape}")
    affine = np.diag([-float(spacing[1]), -float(spacing[0]), 1.0, 1.0])
    img = _nifti_image(np.ascontiguousarray(data.T.astype(dtype, copy=False)), affine, None)
    img.header.set_xyzt_units("mm")
    return _save_image(img, path)


def save_image_png(images, path: str | os.PathLike, *, columns: int | None = None, bits: int = 8) -> Path:
    """2D images ``(rows, columns)`` with values in [0, 1] (clipped) as one grayscale PNG: a single image at its
    size, several side by side in a grid of ``columns`` (default: about square), 2 px apart; 8 or 16 bits."""
    from PIL import Image

    stack = np.asarray(images, dtype=np.float32)
    stack = stack[None] if stack.ndim == 2 else stack
    if stack.ndim != 3 or bits not in (8, 16):
        raise ValueError(f"save_image_png needs (rows, columns) images and 8 or 16 bits, got {stack.shape}, {bits}")
    n, h, w = stack.shape
    cols = columns or math.ceil(math.sqrt(n))
    rows, gap = math.ceil(n / cols), 2 if n > 1 else 0
    grid = np.zeros((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), np.float32)
    for i, image in enumerate(stack):
        r, c = divmod(i, cols)
        grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = image
    top = 2**bits - 1
    pixels = np.round(np.clip(grid, 0, 1) * top).astype(np.uint8 if bits == 8 else np.uint16)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    return Path(path)


def save_vector_nifti(channels, affine, path: str | os.PathLike, *, names: Sequence[str] | None = None,
                      dtype=np.float32, descrip: str | None = None) -> Path:
    """Write ``channels`` ``(C, X, Y, Z)`` as one NIfTI vector image (module docstring): data ``(X, Y, Z, 1, C)``,
    ``dim[5] = C``, intent code ``NIFTI_INTENT_VECTOR``, ``intent_name`` the comma-joined ``names`` (at most 15
    characters, NIfTI's limit), qform = sform = ``affine`` (code 1)."""
    data = np.asarray(channels)
    if data.ndim != 4:
        raise ValueError(f"save_vector_nifti needs channels (C, X, Y, Z), got shape {data.shape}")
    if names is not None and len(names) != data.shape[0]:
        raise ValueError(f"{len(names)} channel names for {data.shape[0]} channels")
    data = np.moveaxis(data.astype(dtype, copy=False), 0, -1)[:, :, :, None, :]
    img = _nifti_image(np.ascontiguousarray(data), affine, descrip)
    img.header.set_intent("vector", (), name=",".join(names)[:15] if names else "")
    img.header.set_xyzt_units("mm")
    return _save_image(img, path)


def read_channels(path: str | os.PathLike, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """``(array (X, Y, Z, C), affine)`` of a per-voxel vector NIfTI (:func:`save_vector_nifti`, ``(X, Y, Z, 1, C)``)
    or of a channel-last 4D file ``(X, Y, Z, C)`` (the layout meddiff3d wrote before vectors); a 3D file gives C = 1.
    Raises ``ValueError`` for other layouts (e.g. a 5D file with more than one time point)."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=dtype)
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    elif data.ndim == 3:
        data = data[..., None]
    elif data.ndim != 4:
        raise ValueError(f"{path}: shape {data.shape} is neither (X, Y, Z, 1, C) vectors nor (X, Y, Z, C)")
    return data, np.asarray(img.affine, dtype=np.float64)


# ------------------------------------------------------------------------------------------------ previews
def _to_ras(volume: np.ndarray, affine) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``volume`` with its axes permuted / flipped to the closest RAS axes, and the voxel size (mm) along each."""
    if affine is None:
        return volume, (1.0, 1.0, 1.0)
    from nibabel.orientations import apply_orientation, io_orientation

    affine = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    spacing = [1.0, 1.0, 1.0]
    for axis, (out_axis, _) in enumerate(ornt):
        spacing[int(out_axis)] = float(zooms[axis])
    return apply_orientation(volume, ornt), tuple(spacing)


def _views(vol: np.ndarray, spacing: Sequence[float], convention: str) -> list[dict[str, Any]]:
    """The three centre slices of a RAS volume as display arrays (row 0 = top), with their letters and mm sizes."""
    cx, cy, cz = (s // 2 for s in vol.shape)
    sx, sy, sz = spacing
    lr = ("R", "L") if convention == "radiological" else ("L", "R")
    flip = (lambda a: a[:, ::-1]) if convention == "radiological" else (lambda a: a)
    return [  # left / right / top / bottom letters; sagittal: anterior on the left, as radiology shows it
        {"name": "axial", "index": (cz, vol.shape[2]), "slice": lambda v: flip(v[:, :, cz].T[::-1]),
         "letters": (*lr, "A", "P"), "mm": (vol.shape[0] * sx, vol.shape[1] * sy)},
        {"name": "coronal", "index": (cy, vol.shape[1]), "slice": lambda v: flip(v[:, cy, :].T[::-1]),
         "letters": (*lr, "S", "I"), "mm": (vol.shape[0] * sx, vol.shape[2] * sz)},
        {"name": "sagittal", "index": (cx, vol.shape[0]), "slice": lambda v: v[cx, :, :].T[::-1, ::-1],
         "letters": ("A", "P", "S", "I"), "mm": (vol.shape[1] * sy, vol.shape[2] * sz)},
    ]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: the small bitmap font
        return ImageFont.load_default()


def _rgb(colour: Sequence[float]) -> tuple[int, int, int]:
    values = [float(c) for c in colour]
    scale = 255.0 if max(values) <= 1.0 else 1.0
    return tuple(int(round(min(255.0, c * scale))) for c in values[:3])  # type: ignore[return-value]


def save_preview_png(volume, path: str | os.PathLike, overlay=None, title: str | None = None, *, affine=None,
                     legend: Mapping[int, tuple[str, Sequence[float]]] | None = None, notes: Sequence[str] = (),
                     convention: str = "radiological", min_view: int = PREVIEW_MIN_VIEW) -> Path:
    """Save the axial, coronal and sagittal centre slices of a 3D volume side by side as PNG.

    Args:
        volume: ``(X, Y, Z)`` (or ``(1, X, Y, Z)``) intensities, windowed to their 0.5-99.5th percentiles.
        overlay: same shape; values drawn in colour where non-zero: each value of ``legend`` in its colour (integer
            label maps), or, without a legend, every non-zero voxel in red.
        title: first line of the header.
        affine: the volume's voxel-to-RAS affine: views are cut along the closest RAS axes and scaled to square
            millimetres. ``None`` means the array axes already are RAS at equal spacing.
        legend: ``{value: (name, (r, g, b))}`` (colour in [0, 1] or 0-255), drawn as a legend under the views.
        notes: extra lines under the legend (e.g. the threshold that made the overlay).
        convention: ``"radiological"`` (patient's right on image left, default, as 3D Slicer shows it) or
            ``"neurological"``; written on the image. Sagittal views show anterior on the left.
        min_view: smallest side of every view in pixels (all views share one scale in pixels per mm).

    Every view carries its orientation letters (R/L, A/P, S/I) at its edges. The PNG's text chunk
    ``meddiff3d-preview`` holds the layout as JSON: convention, scale and each view's box ``[left, top, right,
    bottom]`` (pixels).
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 4:
        vol = vol[0]
    if vol.ndim != 3:
        raise ValueError(f"preview needs a 3D volume, got shape {vol.shape}")
    ov = None
    if overlay is not None:
        ov = np.asarray(overlay)
        ov = ov[0] if ov.ndim == 4 else ov
        if ov.shape != vol.shape:
            raise ValueError(f"overlay shape {ov.shape} differs from the volume's {vol.shape}")
        ov, _ = _to_ras(np.rint(ov.astype(np.float32)).astype(np.int32), affine)
        if not legend:
            ov, legend = (ov != 0).astype(np.int32), {1: ("overlay", (1.0, 0.2, 0.1))}
    vol, spacing = _to_ras(vol, affine)
    finite = vol[np.isfinite(vol)]
    lo, hi = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0))
    scale = max(float(hi - lo), 1e-8)
    views = _views(vol, spacing, convention)
    px_per_mm = min_view / min(min(v["mm"]) for v in views)
    font, small = _font(max(14, min_view // 18)), _font(max(12, min_view // 22))
    gap, margin, line = 12, 10, max(14, min_view // 18) + 6

    panels = []
    for view in views:
        width, height = (max(min_view, math.ceil(mm * px_per_mm - 1e-6)) for mm in view["mm"])
        grey = np.nan_to_num(np.clip((view["slice"](vol) - lo) / scale, 0, 1)) * 255
        image = Image.fromarray(grey.astype(np.uint8)).resize((width, height), Image.BILINEAR).convert("RGB")
        if ov is not None:
            labels = Image.fromarray(view["slice"](ov).astype(np.int32)).resize((width, height), Image.NEAREST)
            labels, rgb = np.asarray(labels), np.asarray(image, dtype=np.float32)
            for value, (_, colour) in legend.items():
                mask = labels == int(value)
                rgb[mask] = 0.45 * rgb[mask] + 0.55 * np.asarray(_rgb(colour), np.float32)
            image = Image.fromarray(rgb.astype(np.uint8))
        panels.append(image)

    header = [t for t in (title, f"{convention} view: {CONVENTIONS[convention]}") if t]
    entries = [(name, _rgb(colour)) for _, (name, colour) in sorted((legend or {}).items())]
    footer = (1 if entries else 0) + len(notes)
    top = margin + line * len(header)
    views_height = max(p.height for p in panels)
    width = 2 * margin + sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = top + views_height + line + line * footer + margin
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(header):
        draw.text((margin, margin + i * line), text, fill=(255, 255, 0) if i == 0 and title else (200, 200, 200),
                  font=font if i == 0 else small)
    boxes, x = {}, margin
    for view, panel in zip(views, panels):
        canvas.paste(panel, (x, top))
        box = (x, top, x + panel.width, top + panel.height)
        boxes[view["name"]] = list(box)
        left, right, up, down = view["letters"]
        cy, cx = top + panel.height // 2, x + panel.width // 2
        style = dict(fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0, 0, 0))
        draw.text((box[0] + 4, cy), left, anchor="lm", **style)
        draw.text((box[2] - 4, cy), right, anchor="rm", **style)
        draw.text((cx, box[1] + 4), up, anchor="mt", **style)
        draw.text((cx, box[3] - 4), down, anchor="mb", **style)
        index, count = view["index"]
        draw.text((box[0], top + views_height + 3), f"{view['name']} (slice {index + 1} of {count})",
                  fill=(200, 200, 200), font=small)
        x += panel.width + gap
    y = top + views_height + line
    if entries:
        x = margin
        for name, colour in entries:
            draw.rectangle((x, y + 2, x + line - 6, y + line - 4), fill=colour)
            draw.text((x + line, y), name, fill=(230, 230, 230), font=small)
            x += line + int(draw.textlength(name, font=small)) + 2 * gap
        y += line
    for note in notes:
        draw.text((margin, y), str(note), fill=(230, 230, 230), font=small)
        y += line
    info = PngInfo()
    info.add_text(PREVIEW_INFO_KEY, json.dumps({"convention": convention, "px_per_mm": round(px_per_mm, 4),
                                                "views": boxes, "legend": [name for name, _ in entries]}))
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG", pnginfo=info)
    return Path(path)
