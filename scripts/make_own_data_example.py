"""Write a folder laid out like a user's own data, for docs/own_data.md: 4 BraTS-named cases, 4 T1 volumes with
lesions and 2 healthy T1 volumes (for calibrating the anomaly detector).

    python scripts/make_own_data_example.py --out my_data

    my_data/brats/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz   (x4, the BraTS 2021 naming)
    my_data/t1/sub-01_T1w.nii.gz ... sub-04_T1w.nii.gz                          (x4, two of them stored LPS)
    my_data/t1_healthy/ctrl-01_T1w.nii.gz, ctrl-02_T1w.nii.gz                   (x2, healthy)

The volumes are the project's synthetic subjects (``meddiff3d synth``: warps of the MNI152 template with tumours,
and T1 brains with lesions of known extent), so every answer is known; the T1 files are skull-stripped, 1 mm.
Two T1 files are written in LPS voxel order (axes flipped, affine adjusted: the same image in world space) to show
that orientation does not matter. Nothing is resampled.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: --out {out} exists; give a new folder", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        brats = write_cohort("brats", Path(tmp) / "brats", n=4, seed=args.seed, val_fraction=0.0, test_fraction=0.0,
                             progress=False).datalist
        t1 = write_cohort("anomaly", Path(tmp) / "t1", n=4, seed=args.seed + 1, val_fraction=0.0, test_fraction=1.0,
                          progress=False).datalist
        healthy = write_cohort("healthy", Path(tmp) / "healthy", n=2, seed=args.seed + 2, val_fraction=0.0,
                               test_fraction=0.0, progress=False).datalist
        staging = Path(tmp) / "out"
        root_b, root_t = Path(brats).parent, Path(t1).parent  # datalist paths are relative to the datalist
        for i, item in enumerate(json.loads(Path(brats).read_text())["training"]):
            case = f"BraTS2021_{i:05d}"
            folder = staging / "brats" / case
            folder.mkdir(parents=True)
            for seq, path in zip(SEQUENCES, item["image"]):
                shutil.copy(root_b / path, folder / f"{case}_{seq}.nii.gz")
            shutil.copy(root_b / item["label"], folder / f"{case}_seg.nii.gz")
        (staging / "t1").mkdir()
        for i, item in enumerate(json.loads(Path(t1).read_text())["test"]):
            dst = staging / "t1" / f"sub-{i + 1:02d}_T1w.nii.gz"
            (as_lps if i % 2 else shutil.copy)(root_t / item["image"], dst)
        (staging / "t1_healthy").mkdir()
        for i, item in enumerate(json.loads(Path(healthy).read_text())["training"]):
            shutil.copy(Path(healthy).parent / item["image"], staging / "t1_healthy" / f"ctrl-{i + 1:02d}_T1w.nii.gz")
        shutil.move(str(staging), str(out))
    print(f"wrote {out}/brats (4 BraTS-named cases), {out}/t1 (4 T1 volumes with lesions, 2 of them LPS) and "
          f"{out}/t1_healthy (2 healthy T1 volumes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
