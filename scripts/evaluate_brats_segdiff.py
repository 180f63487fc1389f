"""Evaluate BraTS segmentations (Dice, HD95 per WT/TC/ET, calibration, uncertainty vs errors) from prediction folders.

    python scripts/evaluate_brats_segdiff.py --pred runs/segdiff/pred --datalist data/brats/datalist.json \
        --out runs/segdiff/eval [--section test] [--top-percent 5] [--empty-hd95 diagonal|nan|MM] [--domain brain]

    # diffusion vs baseline side by side (each evaluated and written to OUT/<name>/)
    python scripts/evaluate_brats_segdiff.py --compare diffusion=runs/segdiff/pred baseline=runs/baseline/pred \
        --datalist data/brats/datalist.json --out runs/compare

Writes OUT/cases.csv (one row per case) and OUT/summary.json (mean/median/std per metric, settings, cases) and prints
the means. Prediction folder contract and metric definitions: meddiff3d/evaluation/segmentation.py. A user error
(missing prediction, wrong grid, ...) prints one line naming the file and exits with status 2.
"""

import argparse
import sys
from pathlib import Path


def _named(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {spec!r}")
    return name, Path(folder)


def main(argv=None) -> int:
    from meddiff3d.errors import InputError
    from meddiff3d.evaluation.segmentation import comparison_table, evaluate_segmentation_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--pred", type=Path, help="one prediction folder")
    group.add_argument("--compare", type=_named, nargs="+", metavar="NAME=FOLDER",
                       help="several prediction folders, shown side by side")
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--section", default="test")
    p.add_argument("--top-percent", type=float, default=5.0, help="k of the top-k%% uncertainty region")
    p.add_argument("--bins", type=int, default=10, help="calibration bins")
    p.add_argument("--empty-hd95", default="diagonal", help="HD95 when exactly one mask is empty: diagonal, nan, MM")
    p.add_argument("--domain", choices=("brain", "volume"), default="brain")
    p.add_argument("--statistic", choices=("mean", "median"), default="mean")
    args = p.parse_args(argv)
    runs = dict(args.compare) if args.compare else {"prediction": args.pred}
    if len(runs) != len(args.compare or [None]):
        p.error("--compare names must be unique")
    results = {}
    try:
        for name, folder in runs.items():
            out = args.out / name if args.compare else args.out
            results[name] = evaluate_segmentation_dir(folder, args.datalist, args.section, out / "cases.csv",
                                                      out / "summary.json", top_percent=args.top_percent,
                                                      bins=args.bins, empty_hd95=args.empty_hd95, domain=args.domain)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comparison_table(results, statistic=args.statistic))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
