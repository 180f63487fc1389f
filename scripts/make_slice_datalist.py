"""Axial slices of a 3D T1 datalist as a 2D datalist (the training data of the 2D image diffusion model).

    python scripts/make_slice_datalist.py data/healthy/datalist.json --out data/slices --size 64 64 --slices 12

For every volume of every section (the 3D datalist's split is kept: slices of one subject stay in one section), the
volume is read in RAS order (nibabel's closest canonical), ``--slices`` axial slices are taken evenly over the middle
of its brain (``--band``: fractions of the inferior-superior extent of the voxels above 10 % of the volume's 99.5th
percentile), each shown radiologically (anterior at the top, the patient's right on the image's left), padded to a
square, resampled to ``--size`` (bilinear, antialiased), scaled by the volume's 99.5th percentile to [0, 1] and
written as a 16-bit PNG. Each slice's class is its level: the lower, middle or upper third of the band
(``inferior``, ``middle``, ``superior``).

    OUT/images/<subject>_s<k>.png
    OUT/datalist.json   {"spatial_dims": 2, "modalities": ["t1"], "classes": [...], "pixel_spacing_mm": [..],
                         "source": {...}, "training": [{"id", "image", "class", "subject", "level"}], ...}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meddiff3d.data.slices import slice_datalist
from meddiff3d.errors import InputError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("datalist", type=Path, help="3D datalist of T1 volumes")
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/, datalist.json)")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("ROWS", "COLUMNS"))
    parser.add_argument("--slices", type=int, default=12, help="axial slices per volume")
    parser.add_argument("--band", type=float, nargs=2, default=(0.3, 0.75), metavar=("LOW", "HIGH"),
                        help="fractions of the brain's inferior-superior extent the slices span")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = slice_datalist(args.datalist, args.out, args.size, args.slices, args.band,
                              progress=not args.no_progress)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
