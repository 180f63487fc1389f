"""Paired covariate sweeps of a trained brain_mri_ldm generator: one covariate changed, the others and the seed fixed.

    .venv/bin/python scripts/sweep_brain_ldm.py --codec models/autoencoder.pt --diffusion models/model.pt \
        --datalist data/datalist.json --out outputs/sweeps \
        --sweep ventricular_volume=0.1,0.3,0.5,0.7,0.9 --sweep brain_volume=0.2,0.4,0.6,0.8 [--seeds 0 1 2]

For each ``--sweep NAME=VALUES`` writes OUT/sweep_NAME.json (requested vs measured change: slope, r, per-seed
slopes; the method is meddiff3d/evaluation/sweeps.py) and the samples under OUT/NAME/; the real training volumes are
measured once for all sweeps. Prints one line per sweep. Bad input: one ``error:`` line, exit status 2.
"""

import argparse
import logging
import sys
from pathlib import Path


def parse_sweep(text: str) -> tuple[str, list[float]]:
    name, sep, values = text.partition("=")
    try:
        parsed = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        parsed = []
    if not sep or not name or len(parsed) < 2:
        raise argparse.ArgumentTypeError(f"--sweep {text!r}: expected NAME=V1,V2[,...] with at least two numbers")
    return name.strip(), parsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--diffusion", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sweep", type=parse_sweep, action="append", required=True, metavar="NAME=V1,V2,...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's own)")
    p.add_argument("--sampler", default=None, help="sampler (default: the model's own)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1: none)")
    p.add_argument("--max-real", type=int, default=64, help="real items per datalist section measured (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from meddiff3d.errors import InputError
    from meddiff3d.evaluation.sweeps import paired_sweeps

    try:
        results = paired_sweeps(args.codec, args.diffusion, args.datalist, args.out, dict(args.sweep),
                                seeds=args.seeds, steps=args.steps, sampler=args.sampler,
                                guidance_scale=args.guidance_scale,
                                max_real=args.max_real or None, device=args.device, amp=args.amp)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for name, result in results.items():
        stats = result["statistics"]
        print(f"{name}: slope {stats['slope']} r {stats['r']} over {stats['n_pairs']} paired changes "
              f"(per seed {stats['slope_per_seed']}) -> {args.out / f'sweep_{name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
