"""``meddiff3d segment``: BraTS tumour segmentation by the segmentation bundle's own inference (``configs/inference.yaml``).

    meddiff3d segment [--bundle B] -i CASE_DIR | FOLDER_OF_CASE_DIRS | DATALIST.json [--section S] [-o OUT]
                      [--num-samples N] [--steps K] [--sampler X] [--seed S] [--threshold P] [--roi-size X Y Z]

``-i`` is a BraTS case folder (its four sequences named like BraTS: ``CASE_{t1,t1ce,t2,flair}.nii.gz``, 2021, or
``CASE-{t1n,t1c,t2w,t2f}.nii.gz``, 2023; a ``_seg`` file is allowed), a folder of such case folders (every case is
segmented; they are indexed as ``meddiff3d datalist brats`` does, into a temporary datalist), or a datalist JSON
(every section that has items, or ``--section``). Writes per case ``OUT/<id>/<id>_seg.nii.gz`` (BraTS labels),
``_prob``, ``_variance``, ``_entropy.nii.gz`` (WT/TC/ET), ``_preview.png`` and ``_segdiff.json``, on the grid and
affine of the case's own files.

flag                  bundle config key   meaning
--bundle B            bundle_root         bundle folder (default: the shipped brats_mri_segdiff)
-i, --input IN        datalist            a case folder or a folder of them (a temporary datalist of every case,
                                          section test), or a datalist JSON
--section S           section             training | validation | test (a datalist -i only; default: the
                                          config's, every section that has items)
-o, --output OUT      output_dir          default ./outputs/segmentation under the current folder
--num-samples N       num_samples         ensemble size
--steps K             steps               sampler steps per sample
--sampler X           sampler             ddim | dpmpp_2m | dpmpp_3m | unipc | ddpm | euler | heun
--seed S              seed                seed of the first sample
--threshold P         threshold           probability above which a voxel is in a region
--roi-size X Y Z      roi_size            run the network window by window (bounded memory)
--device D            device              auto | cpu | cuda | cuda:N
--amp A               amp                 auto | bf16 | fp16 | none
--skip-incomplete     (none)              a folder -i: leave out, with a warning, cases missing a sequence
Unset flags keep the bundle config's values (python -m monai.bundle run --key value runs the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meddiff3d.tasks.bundle import (absolute, add_bundle_arguments, common_overrides, datalist_input, default_output,
                                    find_bundle, input_path, run_bundle, setup_logging)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="IN",
                        help="BraTS case folder, folder of case folders, or datalist JSON")
    parser.add_argument("--section", choices=("training", "validation", "test"),
                        help="datalist section (default: every section that has items)")
    parser.add_argument("-o", "--output", metavar="OUT", help="output folder (default ./outputs/segmentation)")
    parser.add_argument("--num-samples", type=int, metavar="N", help="ensemble size")
    parser.add_argument("--steps", type=int, metavar="K")
    parser.add_argument("--sampler", metavar="X", help="ddim | dpmpp_2m | dpmpp_3m | unipc | ddpm | euler | heun")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--threshold", type=float, metavar="P")
    parser.add_argument("--roi-size", type=int, nargs=3, metavar=("X", "Y", "Z"))
    parser.add_argument("--skip-incomplete", action="store_true",
                        help="folder input: skip (with a warning) cases missing a sequence")
    add_bundle_arguments(parser, "segmentation", __doc__ or "")


def overrides(args: argparse.Namespace) -> dict:
    """The config keys the flags set, but ``datalist`` / ``section`` (what ``-i`` becomes)."""
    keys = {"num_samples": args.num_samples, "steps": args.steps, "sampler": args.sampler, "seed": args.seed,
            "threshold": args.threshold, "roi_size": list(args.roi_size) if args.roi_size else None}
    out = {key: value for key, value in keys.items() if value is not None}
    out["output_dir"] = absolute(args.output or default_output("segmentation"))
    return {**out, **common_overrides(args)}


def case_datalist(src: Path, out: Path, skip_incomplete: bool = False) -> str:
    """Write a datalist ``out`` of every BraTS case in the folder ``src`` (a case folder or a folder of them), all in
    the ``test`` section (returned); the indexing of ``meddiff3d datalist brats`` (headers checked here, voxels by the
    bundle)."""
    from meddiff3d.data.preprocess import brats_to_datalist

    brats_to_datalist(src, out, fractions=(0.0, 0.0, 1.0), skip_incomplete=skip_incomplete, check_images="header")
    return "test"


def run(args: argparse.Namespace) -> int:
    setup_logging()
    bundle = find_bundle(args.bundle, "segmentation", "segment")
    keys = overrides(args)
    with datalist_input("segment", input_path(args.input), args.section,
                        lambda src, out: case_datalist(src, out, args.skip_incomplete),
                        "a BraTS case folder, a folder of case folders or a datalist JSON") as given:
        folders = [Path(f) for f in run_bundle(bundle, "inference.yaml", {**keys, **given})]
    print(f"meddiff3d segment: {len(folders)} case(s) segmented into {keys['output_dir']}")
    for folder in folders:
        files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        print(f"  {folder}/: {', '.join(files)}")
    return 0
