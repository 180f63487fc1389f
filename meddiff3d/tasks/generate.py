"""``meddiff3d generate``: T1 brain volumes from the generation bundle's own inference (``configs/inference.yaml``).

    meddiff3d generate [--bundle B] [--covariates age=0.7,sex=1] [--num-samples N] [--seed S] [--steps K]
                       [--sampler X] [--guidance-scale G] [-o OUT]

Writes per sample ``OUT/sample_seed<S>.nii.gz`` (float32, RAS affine of the model grid), a ``.png`` preview and a
``.json`` sidecar (settings, covariates, model hashes) beside it: the bundle's outputs, the bundle's names.

flag                  bundle config key   meaning
--bundle B            bundle_root         bundle folder (default: the shipped brain_mri_ldm)
--covariates K=V,...  covariates          names given replace the config's values, the others keep theirs;
                                          'none': unconditional (null condition)
--num-samples N       num_samples         volumes to generate (seeds S, S+1, ...)
--seed S              seed                seed of the first sample
--steps K             steps               sampler steps
--sampler X           sampler             ddim | ddpm | dpmpp_2m | dpmpp_3m | unipc | euler | heun
--guidance-scale G    guidance_scale      classifier-free guidance (1: the conditional model)
-o, --output OUT      output_dir          default ./outputs/generation under the current folder
--device D            device              auto | cpu | cuda | cuda:N
--amp A               amp                 auto | bf16 | fp16 | none
Unset flags keep the bundle config's values (python -m monai.bundle run --key value runs the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meddiff3d.tasks.bundle import (absolute, add_bundle_arguments, common_overrides, default_output, find_bundle,
                                    run_bundle, setup_logging)

__all__ = ["add_arguments", "run", "overrides"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--covariates", metavar="K=V,...", help="e.g. age=0.7,sex=1 (model scale, [0, 1]); 'none': "
                        "unconditional")
    parser.add_argument("--num-samples", type=int, metavar="N")
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--steps", type=int, metavar="K")
    parser.add_argument("--sampler", metavar="X", help="ddim | ddpm | dpmpp_2m | dpmpp_3m | unipc | euler | heun")
    parser.add_argument("--guidance-scale", type=float, metavar="G")
    parser.add_argument("-o", "--output", metavar="OUT", help="output folder (default ./outputs/generation)")
    add_bundle_arguments(parser, "generation", __doc__ or "")


def overrides(args: argparse.Namespace) -> dict:
    """The config keys the flags set (unset flags: the config's own values)."""
    keys = {"num_samples": args.num_samples, "seed": args.seed, "steps": args.steps, "sampler": args.sampler,
            "guidance_scale": args.guidance_scale}
    out = {key: value for key, value in keys.items() if value is not None}
    out["output_dir"] = absolute(args.output or default_output("generation"))
    return {**out, **common_overrides(args)}


def _merge_covariates(text: str):
    """``prepare`` for :func:`run_bundle`: the given covariates over the config's own (``none``: unconditional)."""
    from meddiff3d.checks import parse_covariates

    given = parse_covariates(text, "--covariates")

    def prepare(parser) -> None:
        if given is None:
            parser["covariates"] = None
            return
        current = parser.get("covariates")
        parser["covariates"] = {**(current if isinstance(current, dict) else {}), **given}

    return prepare


def run(args: argparse.Namespace) -> int:
    setup_logging()
    bundle = find_bundle(args.bundle, "generation", "generate")
    prepare = _merge_covariates(args.covariates) if args.covariates is not None else None
    keys = overrides(args)
    paths = [Path(p) for p in run_bundle(bundle, "inference.yaml", keys, prepare)]
    print(f"meddiff3d generate: {len(paths)} volume(s) written to {keys['output_dir']}")
    for path in paths:
        stem = path.name.removesuffix(".nii.gz")
        extras = [p.name for p in sorted(path.parent.glob(f"{stem}.*")) if p != path]
        print(f"  {path}" + (f"  (+ {', '.join(extras)})" if extras else ""))
    return 0
