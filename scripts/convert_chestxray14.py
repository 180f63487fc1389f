"""A folder of chest radiographs with the NIH ChestX-ray14 label CSV -> a 2D datalist at the model's size.

    python scripts/convert_chestxray14.py NIH/images NIH/Data_Entry_2017.csv --out data/cxr128 --size 128
    python scripts/convert_chestxray14.py NIH/images NIH/Data_Entry_2017.csv --out data/cxr_eff --findings Effusion

The CSV is the one NIH distributes (columns ``Image Index``, ``Finding Labels`` -- findings joined by ``|``, or
``No Finding`` --, ``Patient ID``, ``Patient Age``, ``Patient Gender``, ``View Position``, and, when present,
``OriginalImage[Width``, ``Height]``, ``OriginalImagePixelSpacing[x``, ``y]``: the original radiograph's size and
spacing, from which the output's pixel spacing follows); only the rows whose image is in the folder are
used. Classes: ``No Finding`` and
``Finding`` (any finding) by default; with ``--findings A B``, ``No Finding``, ``A`` and ``B``, keeping the images
whose label is exactly one of them (the others are skipped, and counted). The split is by patient (all images of a
patient in one section; ``--fractions`` training/validation/test, seeded). Each image is read and checked
(:func:`meddiff3d.data.images2d.read_image_2d`: grayscale, finite, not constant), resampled to ``--size``
(bilinear, antialiased: 1024 -> 128 averages 8x8 pixels), its own range (minimum to maximum) mapped to 0-255, and
written as an 8-bit PNG.

    OUT/images/<image index>.png
    OUT/datalist.json  {"spatial_dims": 2, "modalities": ["xray"], "classes": [...], "training": [{"id", "image",
                        "class", "findings", "patient", "age", "sex", "view", "pixel_spacing_mm"}], ...}

Everything is read and checked before anything is written.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from meddiff3d.checks import check_memory, check_output_dir, safe_name
from meddiff3d.data.datalist import split_ids, write_checked_datalist
from meddiff3d.data.images2d import read_image_2d, resample
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_image_png

COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
#: the original radiograph's (width, height) in pixels and (x, y) spacing in mm, as NIH's CSV splits them
ORIGINAL = ("OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]")
NORMAL = "No Finding"


def read_rows(csv_path: Path, images: Path) -> list[dict[str, str]]:
    """The CSV rows whose image is in ``images`` (checked columns)."""
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: label CSV not found")
    with open(csv_path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {missing}; a ChestX-ray14 CSV has {list(COLUMNS)}")
        rows = list(reader)
    present = {p.name for p in images.iterdir()} if images.is_dir() else None
    if present is None:
        raise InputError(f"{images}: image folder not found")
    return [row for row in rows if row["Image Index"] in present]


def original_spacing(row: dict[str, str], csv_path: Path, size: int) -> list[float] | None:
    """The output's pixel spacing ``[row, column]`` in mm from the original radiograph's size and spacing (``None``
    when the CSV has no such columns)."""
    values = [row.get(c) for c in ORIGINAL]
    if any(v in (None, "") for v in values):
        return None
    try:
        width, height, sx, sy = (float(v) for v in values)
    except ValueError:
        raise InputError(f"{csv_path}: image {row['Image Index']}: original size / spacing {values} are not "
                         f"numbers") from None
    return [sy * height / size, sx * width / size]


def class_of(findings: str, chosen: list[str]) -> str | None:
    """The class of an image's ``Finding Labels`` (module docstring), ``None`` to skip it."""
    labels = [f.strip() for f in findings.split("|") if f.strip()]
    if labels == [NORMAL]:
        return NORMAL
    if not chosen:
        return "Finding"
    return labels[0] if len(labels) == 1 and labels[0] in chosen else None


def convert(images: Path, csv_path: Path, out: Path, size: int, findings: list[str], fractions: list[float],
            seed: int, progress: bool = True) -> tuple[Path, dict[str, int]]:
    out = check_output_dir(out, "--out")
    rows = read_rows(csv_path, images)
    classes = [NORMAL, *(findings or ["Finding"])]
    kept, skipped = [], 0
    for row in rows:
        label = class_of(row["Finding Labels"], findings)
        if label is None:
            skipped += 1
            continue
        kept.append((row, label))
    if not kept:
        raise InputError(f"{csv_path}: no image of the folder {images} has one of the classes {classes}")
    check_memory(f"{len(kept)} radiographs of {size}x{size} pixels", len(kept) * (size * size + 256))
    converted = {}
    for row, _ in tqdm(kept, desc="reading radiographs", disable=not progress):
        image = read_image_2d(images / row["Image Index"])
        small = resample(torch.from_numpy(image.array)[None, None], (size, size))[0, 0].numpy()
        low, high = float(small.min()), float(small.max())
        pixels = np.round((small - low) / max(high - low, 1e-8) * 255).astype(np.uint8)
        converted[row["Image Index"]] = (pixels, original_spacing(row, csv_path, size))
    patients = sorted({row["Patient ID"] for row, _ in kept})
    split = {p: name for name, ids in split_ids(patients, fractions, seed).items() for p in ids}
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for row, label in kept:
        stem = safe_name("image index", Path(row["Image Index"]).stem)
        sections[split[row["Patient ID"]]].append({
            "id": stem, "image": str(out / "images" / f"{stem}.png"), "class": label,
            "findings": row["Finding Labels"], "patient": row["Patient ID"], "age": row["Patient Age"],
            "sex": row["Patient Gender"], "view": row["View Position"],
            "pixel_spacing_mm": converted[row["Image Index"]][1]})
    for name, (pixels, _) in converted.items():
        save_image_png(pixels / 255.0, out / "images" / f"{Path(name).stem}.png")
    counts = {c: sum(1 for _, label in kept if label == c) for c in classes}
    path = write_checked_datalist(out / "datalist.json", {k: v for k, v in sections.items() if v},
                                  name="ChestX-ray14", spatial_dims=2, modalities=["xray"], classes=classes,
                                  source={"images": str(images), "labels": str(csv_path), "size": size,
                                          "skipped": skipped, "per_class": counts, "split": "by patient"})
    return path, {**counts, "skipped": skipped}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=Path, help="folder of the radiographs (PNG)")
    parser.add_argument("labels", type=Path, help="the ChestX-ray14 CSV (Data_Entry_2017.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=128, help="output side in pixels (default 128)")
    parser.add_argument("--findings", nargs="*", default=[], help="findings to keep as classes (default: any)")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if not 8 <= args.size <= 2048:
            raise InputError(f"--size must be in 8-2048, got {args.size}")
        path, counts = convert(args.images, args.labels, args.out, args.size, list(args.findings),
                               list(args.fractions), args.seed, progress=not args.no_progress)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
