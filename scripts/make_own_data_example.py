"""Write a folder laid out like a user's own data, for docs/own_data.md: 2 BraTS-named cases, 2 T1 volumes with
lesions and 2 healthy T1 volumes (for calibrating the anomaly detector).

    python scripts/make_own_data_example.py --out my_data

    my_data/brats/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz   (x2, the BraTS 2021 naming)
    my_data/t1/sub-01_T1w.nii.gz, sub-02_T1w.nii.gz                             (x2, the second stored LPS)
    my_data/t1_healthy/ctrl-01_T1w.nii.gz, ctrl-02_T1w.nii.gz                   (x2, healthy)

The volumes are the project's synthetic subjects (``meddiff3d synth``: warps of the MNI152 template with tumours,
and T1 brains with lesions of known extent), so every answer is known; the T1 files are skull-stripped, 1 mm.
One T1 file is written in LPS voxel order (axes flipped, affine adjusted: the same image in world space) to show
that orientation does not matter. Nothing is resampled.

The doc-command tests build their small inputs with :func:`write_brats_cases` and :func:`write_t1_files` (keyword
``cohort`` = ``write_cohort`` arguments such as a small ``shape`` and ``source="procedural"``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from meddiff3d.data.synthetic import write_cohort

SEQUENCES = ("t1", "t1ce", "t2", "flair")


def as_lps(src: Path, dst: Path) -> None:
    """``src`` (RAS voxel order) stored with its first two voxel axes reversed, the affine adjusted to match."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[::-1, ::-1, :]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [data.shape[0] - 1, data.shape[1] - 1]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), img.affine @ flip), str(dst))


def write_brats_cases(out: Path, n: int, seed: int, **cohort) -> list[str]:
    """``n`` synthetic BraTS cases as BraTS 2021 names them, ``out/BraTS2021_0000k/BraTS2021_0000k_<seq>.nii.gz``
    (t1, t1ce, t2, flair, seg); returns the case names."""
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_cohort("brats", Path(tmp) / "brats", n=n, seed=seed, val_fraction=0.0, test_fraction=0.0,
                                progress=False, **cohort).datalist
        root = Path(datalist).parent  # datalist paths are relative to the datalist
        cases = []
        for i, item in enumerate(json.loads(Path(datalist).read_text())["training"]):
            case = f"BraTS2021_{i:05d}"
            folder = out / case
            folder.mkdir(parents=True)
            for seq, path in zip(SEQUENCES, item["image"]):
                shutil.copy(root / path, folder / f"{case}_{seq}.nii.gz")
            shutil.copy(root / item["label"], folder / f"{case}_seg.nii.gz")
            cases.append(case)
    return cases


def write_t1_files(out: Path, kind: str, n: int, seed: int, prefix: str, *, lps_every: int = 0,
                   **cohort) -> list[Path]:
    """``n`` synthetic T1 volumes (``kind`` "anomaly": with lesions; "healthy") as ``out/<prefix>-0k_T1w.nii.gz``;
    with ``lps_every`` = 2 every second file is stored in LPS voxel order. Returns the files."""
    out = Path(out)
    out.mkdir(parents=True)
    section = "test" if kind == "anomaly" else "training"
    with tempfile.TemporaryDirectory() as tmp:
        datalist = write_cohort(kind, Path(tmp) / kind, n=n, seed=seed, val_fraction=0.0,
                                test_fraction=1.0 if section == "test" else 0.0, progress=False, **cohort).datalist
        files = []
        for i, item in enumerate(json.loads(Path(datalist).read_text())[section]):
            dst = out / f"{prefix}-{i + 1:02d}_T1w.nii.gz"
            (as_lps if lps_every and i % lps_every else shutil.copy)(Path(datalist).parent / item["image"], dst)
            files.append(dst)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: --out {out} exists; give a new folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:  # all or nothing: written there, moved to --out at the end
        staging = Path(tmp) / "out"
        write_brats_cases(staging / "brats", 2, args.seed)
        write_t1_files(staging / "t1", "anomaly", 2, args.seed + 1, "sub", lps_every=2)
        write_t1_files(staging / "t1_healthy", "healthy", 2, args.seed + 2, "ctrl")
        shutil.move(str(staging), str(out))
    print(f"wrote {out}/brats (2 BraTS-named cases), {out}/t1 (2 T1 volumes with lesions, one of them LPS) and "
          f"{out}/t1_healthy (2 healthy T1 volumes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
