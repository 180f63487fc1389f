"""The reconstruction table of an image diffusion model: undersampled k-space and super-resolution on held-out 2D
slices, against the classical baselines, all on the same operators and measurements.

    python scripts/evaluate_inverse_problems.py --model models/model.pt --datalist data/slices/datalist.json \\
        --out outputs/inverse_problems --n 16 --accelerations 4 8 --factors 2 4

Each slice (a test image in [0, 1]) is measured once per setting, without noise:

* k-space: Cartesian random masks (fastMRI's centre fractions: 8 % at 4x, 4 % at 8x; a new mask per slice);
  methods ``zero_filled``, ``tv`` (total-variation CS) and ``diffusion`` (posterior mean of ``--samples``
  DataConsistency samples);
* super-resolution: block means of ``factor x factor`` pixels; methods ``bicubic``, ``bspline``, ``tv``,
  ``diffusion``.

The TV weight of each setting is chosen on ``--tune`` validation slices (best PSNR over a grid), never on the test
slices. Scores per slice: PSNR and SSIM over the image and inside the brain (pixels > 0.02 of the truth), NMSE, and
seconds. Writes ``OUT/table.json`` (means per setting and method), ``OUT/per_slice.csv`` and ``OUT/examples.png``
(truth, zero-filled / bicubic, TV, diffusion of the first slice per setting).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from meddiff3d.checks import check_output_dir
from meddiff3d.data.datalist import load_datalist
from meddiff3d.data.images2d import read_image_2d
from meddiff3d.diffusion import Downsample, KSpaceSampling, cartesian_mask
from meddiff3d.engine.reconstruction_metrics import reconstruction_scores
from meddiff3d.errors import InputError
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.inferers import ImageDiffusionInferer
from meddiff3d.pipelines.inverse_problems import (diffusion_reconstruction, interpolate, nmse, tv_reconstruction,
                                                  zero_filled)
from meddiff3d.utils.io import save_image_png, save_json

CENTRE_FRACTION = {4: 0.08, 8: 0.04}
TV_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
BRAIN = 0.02


def slices(datalist: Path, section: str, n: int, shape: list[int]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for item in load_datalist(datalist, section, check_images="header")[:n]:
        image = read_image_2d(item["image"])
        if list(image.shape) != list(shape):
            raise InputError(f"{item['image']}: {list(image.shape)} pixels, the model's images are {shape}")
        out.append((str(item["id"]), torch.from_numpy(image.array / image.full_scale()).float()[None, None]))
    return out


def settings(accelerations: list[int], factors: list[int]) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = [(f"kspace_{a}x", a) for a in accelerations]
    return out + [(f"sr_{f}x", f) for f in factors]


def operator_for(name: str, value: int, width: int, seed: int):
    if name.startswith("kspace"):
        return KSpaceSampling(cartesian_mask(width, value, CENTRE_FRACTION.get(value, 0.32 / value), "random",
                                             seed=seed)), 1.0
    return Downsample((value, value)), 1.0 / value


def methods(name: str, value: int, op, norm: float, y: torch.Tensor, lam: float, model, args) -> dict:
    """``{method: (estimate, seconds)}`` for one measurement."""
    inferer = ImageDiffusionInferer(model.meta, args.sampler, args.steps)
    def timed(fn):
        start = time.perf_counter()
        estimate = fn()
        return estimate, time.perf_counter() - start

    out = {}
    if name.startswith("kspace"):
        out["zero_filled"] = timed(lambda: zero_filled(op, y))
    else:
        for method in ("bicubic", "bspline"):
            out[method] = timed(lambda m=method: interpolate(y, (value, value), m))
    out["tv"] = timed(lambda: tv_reconstruction(op, y, lam, iterations=args.tv_iterations, operator_norm=norm))
    out["diffusion"] = timed(lambda: diffusion_reconstruction(model.network, inferer, op, y,
                                                              num_samples=args.samples, seed=args.seed,
                                                              nonnegative=name.startswith("kspace"))[0])
    return out


def tune_tv(name: str, value: int, images, width: int, iterations: int) -> float:
    best = None
    for lam in TV_GRID:
        scores = []
        for k, (_, x) in enumerate(images):
            op, norm = operator_for(name, value, width, 10_000 + k)
            estimate = tv_reconstruction(op, op.forward(x), lam, iterations=iterations, operator_norm=norm)
            scores.append(reconstruction_scores(estimate.clamp(0, 1), x)["psnr"])
        if best is None or np.mean(scores) > best[1]:
            best = (lam, float(np.mean(scores)))
    return best[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--datalist", type=Path, required=True, help="2D datalist of the slices")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--section", default="test")
    parser.add_argument("--n", type=int, default=16, help="test slices")
    parser.add_argument("--tune", type=int, default=4, help="validation slices to choose the TV weight on")
    parser.add_argument("--accelerations", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--factors", type=int, nargs="*", default=[2, 4])
    parser.add_argument("--samples", type=int, default=1, help="posterior samples averaged per reconstruction")
    parser.add_argument("--sampler", default="dpmpp_2m")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tv-iterations", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", help="auto | bf16 | fp16 | none (the diffusion model's precision)")
    args = parser.parse_args(argv)
    try:
        if min(args.n, args.tune, args.samples, args.steps, args.tv_iterations) < 1:
            raise InputError("--n, --tune, --samples, --steps and --tv-iterations must be >= 1")
        if not args.accelerations + args.factors:
            raise InputError("nothing to evaluate: give --accelerations and/or --factors")
        device = resolve_device(args.device)
        model = load_model(args.model, "image_diffusion", device=device,
                           dtype=resolve_precision(args.amp, device, "inference").dtype)
        shape = model.meta["image"]["shape"]
        for a in args.accelerations:
            cartesian_mask(shape[1], a, CENTRE_FRACTION.get(a, 0.32 / a))  # checks the acceleration
        bad = [f for f in args.factors if f < 2 or any(s % f for s in shape)]
        if bad:
            raise InputError(f"--factors {bad}: each must be >= 2 and divide the model's size {shape}")
        out = check_output_dir(args.out, "--out")
        test = slices(args.datalist, args.section, args.n, shape)
        tune = slices(args.datalist, "validation", args.tune, shape)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    rows, table, examples = [], {}, []
    for name, value in settings(args.accelerations, args.factors):
        lam = tune_tv(name, value, tune, shape[1], args.tv_iterations)
        per_method: dict[str, list[dict]] = {}
        for k, (case, x) in enumerate(test):
            op, norm = operator_for(name, value, shape[1], k)
            y = op.forward(x)
            results = methods(name, value, op, norm, y, lam, model, args)
            for method, (estimate, seconds) in results.items():
                estimate = estimate.clamp(0, 1)
                scores = reconstruction_scores(estimate, x, mask=x > BRAIN)
                row = {"setting": name, "method": method, "slice": case, "psnr": scores["psnr"],
                       "ssim": scores["ssim"], "psnr_brain": scores["psnr_brain"], "ssim_brain": scores["ssim_brain"],
                       "nmse": nmse(estimate, x), "seconds": seconds}
                rows.append(row)
                per_method.setdefault(method, []).append(row)
            if k == 0:
                examples.append(torch.cat([x, *[results[m][0].clamp(0, 1) for m in results]], dim=3)[0, 0].numpy())
            print(f"{name} slice {k + 1}/{len(test)}: " + ", ".join(
                f"{m} {per_method[m][-1]['psnr']:.2f} dB" for m in per_method), flush=True)
        keys = ("psnr", "ssim", "psnr_brain", "ssim_brain", "nmse", "seconds")
        table[name] = {"tv_lambda": lam, "methods": {m: {key: float(np.mean([r[key] for r in v])) for key in keys}
                                                     for m, v in per_method.items()}}
    save_json({"model": str(args.model), "datalist": str(args.datalist), "section": args.section, "slices": len(test),
               "samples": args.samples, "sampler": args.sampler, "steps": args.steps, "brain_threshold": BRAIN,
               "table": table}, out / "table.json")
    with open(out / "per_slice.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    width = max(e.shape[1] for e in examples)
    save_image_png(np.stack([np.pad(e, ((0, 0), (0, width - e.shape[1]))) for e in examples]), out / "examples.png",
                   columns=1)
    print(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
