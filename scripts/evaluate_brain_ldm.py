"""Evaluate a trained brain_mri_ldm generator: conditioning fidelity, diversity, realism, memorisation.

    python scripts/evaluate_brain_ldm.py --codec models/autoencoder.pt --diffusion models/model.pt \
        --datalist data/datalist.json --out runs/eval [--n-per-condition 4] [--conditions 8] \
        [--steps 20 --sampler dpmpp_2m]

Writes OUT/evaluation.json, OUT/samples.csv and the samples (OUT/samples/); prints a summary table. The method is
documented in meddiff3d/evaluation/generative.py.
"""

import argparse
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    from meddiff3d.errors import InputError
    from meddiff3d.evaluation import evaluate, summary_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--diffusion", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-per-condition", type=int, default=4)
    p.add_argument("--conditions", type=int, default=8, help="K covariate vectors drawn from validation/test items")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-unconditional", action="store_true")
    p.add_argument("--max-real", type=int, default=64, help="items per datalist section (0: all)")
    p.add_argument("--max-pairs", type=int, default=24)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = evaluate(args.codec, args.diffusion, args.datalist, args.out, n_per_condition=args.n_per_condition,
                          conditions=args.conditions, steps=args.steps, sampler=args.sampler,
                          guidance_scale=args.guidance_scale, seed=args.seed, unconditional=not args.no_unconditional,
                          max_real=args.max_real or None, max_pairs=args.max_pairs, device=args.device, amp=args.amp)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary_table(result))
    print(f"-> {args.out / 'evaluation.json'}, {args.out / 'samples.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
