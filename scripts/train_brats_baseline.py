"""Train the deterministic BraTS baseline (MONAI SegResNet, WT/TC/ET) for a wall-clock budget, then segment a split.

    # train for 30 minutes of iteration time on a 2 mm grid with 64^3 patches; re-run the same command to resume
    python scripts/train_brats_baseline.py --datalist data/brats/datalist.json --run-dir runs/baseline \
        --out models/baseline.pt --minutes 30 [--spacing 2 2 2] [--patch 64 64 64 | --whole-volume] \
        [--foreground-prob 0.5] [--preset small] [--batch-size 2] [--lr 1e-3] [--threads 1] \
        [--predict-out runs/baseline/pred --predict-section test]

    # segment only, with a trained model
    python scripts/train_brats_baseline.py --datalist data/brats/datalist.json --out models/baseline.pt \
        --predict-only --predict-out runs/baseline/pred

Predictions follow the contract of meddiff3d/evaluation/segmentation.py (``<id>/<id>_seg.nii.gz``, ``_prob.nii.gz``);
evaluate them with ``scripts/evaluate_brats_segdiff.py``. A user error prints one line and exits with status 2.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="the inference file (written by training, read by predict)")
    p.add_argument("--run-dir", type=Path, help="checkpoints and logs (training; an existing run is resumed)")
    p.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of training iterations")
    p.add_argument("--max-iterations", type=int, default=10**9)
    p.add_argument("--spacing", type=float, nargs=3, default=[2.0, 2.0, 2.0], help="training grid in mm")
    p.add_argument("--shape", type=int, nargs=3, default=None, help="grid size (default: the data's field of view)")
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="random training crops")
    p.add_argument("--whole-volume", action="store_true", help="train on whole volumes instead of patches")
    p.add_argument("--foreground-prob", type=float, default=0.0,
                   help="share of patches centred on a tumour voxel (default 0: uniform random patches)")
    p.add_argument("--preset", default="small", help="SegResNet preset: tiny, small, brats")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--section", default="training")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--predict-out", type=Path, default=None, help="segment --predict-section into this folder")
    p.add_argument("--predict-section", default="test")
    p.add_argument("--predict-only", action="store_true", help="skip training; segment with --out")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch

    from meddiff3d.errors import find_input_error
    from meddiff3d.pipelines.seg_baseline import segment, train_seg_baseline

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.predict_only and args.predict_out is None:
        p.error("--predict-only needs --predict-out")
    if not args.predict_only and args.run_dir is None:
        p.error("training needs --run-dir")
    try:
        if not args.predict_only:
            summary = train_seg_baseline(
                args.datalist, args.run_dir, out=args.out, minutes=args.minutes, spacing=args.spacing,
                shape=args.shape, patch_size=None if args.whole_volume else args.patch,
                foreground_prob=args.foreground_prob, preset=args.preset, batch_size=args.batch_size, lr=args.lr,
                max_iterations=args.max_iterations, checkpoint_every=args.checkpoint_every, seed=args.seed,
                section=args.section, device=args.device)
            print(json.dumps(summary))
        if args.predict_out is not None:
            folders = segment(args.out, args.datalist, args.predict_out, section=args.predict_section,
                              device="cpu" if args.device == "auto" else args.device)
            print(f"{len(folders)} case(s) segmented -> {args.predict_out}")
    except Exception as err:  # MONAI / ignite wrap user errors: report the InputError behind them
        user_error = find_input_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
