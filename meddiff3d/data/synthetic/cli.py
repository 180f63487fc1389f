"""``meddiff3d synth {healthy,brats,anomaly}``: write a synthetic dataset (NIfTI + datalist.json) and time it.

Example: ``python -m meddiff3d synth anomaly --n 20 --out data/anomaly --seed 0 --shape 64 96 64 --source procedural``
"""

from __future__ import annotations

import argparse

from .anatomy import SOURCES
from .cohorts import COHORT_VARIANTS, DEFAULT_FRACTIONS, KINDS, write_cohort
from .grid import DEFAULT_SHAPE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=KINDS, help="cohort kind")
    parser.add_argument("--n", type=int, required=True, help="number of subjects (>= 1)")
    parser.add_argument("--out", required=True, help="output dataset folder (images/, labels/, datalist.json)")
    parser.add_argument("--seed", type=int, default=0, help="cohort seed; subject k depends only on (seed, k)")
    parser.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("X", "Y", "Z"),
                        help="voxels over the fixed 160 x 224 x 160 mm field of view (default 160 224 160 = 1 mm)")
    parser.add_argument("--source", choices=SOURCES, default="mni",
                        help="template anatomy: MNI152 from nilearn (default) or the fast procedural brain")
    defaults = ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in DEFAULT_FRACTIONS.items())
    parser.add_argument("--val-fraction", type=float, default=None, help=f"validation fraction (default: {defaults})")
    parser.add_argument("--test-fraction", type=float, default=None, help="test fraction (default: see above)")
    parser.add_argument("--with-skull", action="store_true", help="keep skull and scalp (default: skull-stripped)")
    parser.add_argument("--variant", choices=COHORT_VARIANTS, default="standard",
                        help="acquisition/population: standard (default), varied (domain randomisation for "
                             "training), out_of_template (the held-out families asymmetric/contrast/phantom in turn), "
                             "or one family alone (meddiff3d.data.synthetic.acquisition)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    summary = write_cohort(
        args.kind, args.out, n=args.n, seed=args.seed, shape=tuple(args.shape), source=args.source,
        val_fraction=args.val_fraction, test_fraction=args.test_fraction, skull_strip=not args.with_skull,
        progress=not args.no_progress, variant=args.variant,
    )
    print(summary.line())
    return 0
