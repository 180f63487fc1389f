"""A folder of chest radiographs with the NIH ChestX-ray14 label CSV -> a 2D datalist at the model's size.

    python scripts/convert_chestxray14.py NIH/images NIH/Data_Entry_2017.csv --out data/cxr128 --size 128
    python scripts/convert_chestxray14.py NIH/images NIH/Data_Entry_2017.csv --out data/cxr_eff --findings Effusion

The CSV is the one NIH distributes (columns ``Image Index``, ``Finding Labels`` -- findings joined by ``|``, or
``No Finding`` --, ``Patient ID``, ``Patient Age``, ``Patient Gender``, ``View Position``,
``OriginalImagePixelSpacing[x``); only the rows whose image is in the folder are used. Classes: ``No Finding`` and
``Finding`` (any finding) by default; with ``--findings A B``, ``No Finding``, ``A`` and ``B``, keeping the images
whose label is exactly one of them (the others are skipped, and counted). The split is by patient (all images of a
patient in one section; ``--fractions`` training/validation/test, seeded). Each image is read and checked
(:func:`meddiff3d.data.images2d.read_image_2d`: grayscale, finite, not constant), resampled to ``--size``
(bilinear, antialiased: 1024 -> 128 averages 8x8 pixels), its 8- or 16-bit range kept, and written as an
8-bit PNG.

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
import torch.nn.functional as F
from tqdm.auto import tqdm

from meddiff3d.checks import check_output_dir, safe_name
from meddiff3d.data.datalist import split_ids, write_datalist
from meddiff3d.data.images2d import read_image_2d
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_image_png

COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
SPACING_COLUMN = "OriginalImagePixelSpacing[x"
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
    converted = {}
    for row, _ in tqdm(kept, desc="reading radiographs", disable=not progress):
        image = read_image_2d(images / row["Image Index"])
        tensor = torch.from_numpy(image.array)[None, None]
        small = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        top = 255.0 if image.array.max() <= 255 else 65535.0  # 8- or 16-bit files
        converted[row["Image Index"]] = (np.clip(small[0, 0].numpy() / top, 0, 1), image.shape)
    patients = sorted({row["Patient ID"] for row, _ in kept})
    split = {p: name for name, ids in split_ids(patients, fractions, seed).items() for p in ids}
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for row, label in kept:
        stem = safe_name("image index", Path(row["Image Index"]).stem)
        pixels, shape = converted[row["Image Index"]]
        original = float(row.get(SPACING_COLUMN) or 0) or None
        sections[split[row["Patient ID"]]].append({
            "id": stem, "image": str(out / "images" / f"{stem}.png"), "class": label,
            "findings": row["Finding Labels"], "patient": row["Patient ID"], "age": row["Patient Age"],
            "sex": row["Patient Gender"], "view": row["View Position"],
            "pixel_spacing_mm": None if original is None else [original * s / size for s in shape]})
    for stem, (pixels, _) in ((Path(k).stem, v) for k, v in converted.items()):
        save_image_png(pixels, out / "images" / f"{stem}.png")
    counts = {c: sum(1 for _, label in kept if label == c) for c in classes}
    path = write_datalist(out / "datalist.json", sections, name="ChestX-ray14", spatial_dims=2,
                          modalities=["xray"], classes=classes,
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
