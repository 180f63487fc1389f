"""Evaluate calibrated anomaly detectors side by side on a labelled datalist split (CSV + JSON).

    python scripts/evaluate_anomaly_ldm.py --codec models/autoencoder.pt --diffusion models/model.pt \
        --calibration diffusion=models/calibration.json --calibration autoencoder=models/calibration_autoencoder.json \
        --datalist data/anomaly/datalist.json --out evaluation [--section test] [--max-volumes N]

Writes OUT/per_volume.csv, OUT/summary.csv and OUT/metrics.json (see meddiff3d.evaluation.anomaly) and prints the
summary table. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from meddiff3d.errors import find_input_error


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", required=True, help="codec file (autoencoder + latent scale/shift)")
    p.add_argument("--diffusion", default=None, help="latent diffusion model (not needed for the baseline alone)")
    p.add_argument("--calibration", action="append", required=True, metavar="NAME=PATH",
                   help="a calibration file, optionally named (repeat for several detectors)")
    p.add_argument("--datalist", required=True)
    p.add_argument("--section", default="test")
    p.add_argument("--out", required=True)
    p.add_argument("--max-volumes", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def calibration_mapping(values: list[str]) -> dict[str, str] | list[str]:
    if all("=" in v for v in values):
        return dict(v.split("=", 1) for v in values)
    return list(values)


def print_summary(metrics: dict) -> None:
    header = f"{'method':<14}{'kind':<12}{'n':>4}{'Dice':>8}{'bestDice':>10}{'AUPRC':>8}{'AUROC':>8}{'volAUROC':>10}"
    print(header)
    fmt = lambda v: "   -" if v is None else f"{v:.3f}"  # noqa: E731
    for method, kinds in metrics["methods"].items():
        for kind, m in kinds.items():
            print(f"{method:<14}{kind:<12}{m['volumes']:>4}{fmt(m['dice']):>8}{fmt(m['best_dice']):>10}"
                  f"{fmt(m['auprc']):>8}{fmt(m['auroc']):>8}{fmt(m['volume_auroc']):>10}")


def main(argv=None) -> int:
    args = parse_args(argv)
    from meddiff3d.evaluation.anomaly import evaluate_anomaly

    try:
        metrics = evaluate_anomaly(args.codec, args.diffusion, calibration_mapping(args.calibration), args.datalist,
                                   args.out, section=args.section, max_volumes=args.max_volumes, device=args.device,
                                   amp=args.amp, progress=not args.no_progress)
    except Exception as err:  # noqa: BLE001 - user errors become one line, bugs keep their traceback
        user_error = find_input_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    print_summary(metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
