"""Generation metrics of a 2D image diffusion model against its 2D datalist (medical_2d_ddpm's model card).

    python scripts/evaluate_image_generation.py --model bundles/medical_2d_ddpm/models/model.pt \\
        --datalist outputs/data/synthetic_slices/datalist.json --out outputs/image_evaluation --samples-per-class 32

Class fidelity, realism, diversity (MS-SSIM), memorisation and seconds per image:
:func:`meddiff3d.evaluation.image_generation.evaluate_image_generation` (its docstring says how each is measured).
Writes ``OUT/evaluation.json`` and ``OUT/samples.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meddiff3d.errors import InputError
from meddiff3d.evaluation.image_generation import evaluate_image_generation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--datalist", type=Path, required=True, help="the model's 2D datalist (training, test)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples-per-class", type=int, default=32)
    parser.add_argument("--sampler", default=None, help="default: the model's own")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto")
    args = parser.parse_args(argv)
    try:
        result = evaluate_image_generation(args.model, args.datalist, args.out,
                                           samples_per_class=args.samples_per_class, sampler=args.sampler,
                                           steps=args.steps, seed=args.seed, device=args.device, amp=args.amp)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("class_fidelity", "diversity_ms_ssim_within_class", "memorisation",
                                             "time") if k in result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
