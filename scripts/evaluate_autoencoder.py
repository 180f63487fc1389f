"""Reconstruction quality of a trained codec on a datalist: PSNR / SSIM inside the brain and over the whole volume.

    .venv/bin/python scripts/evaluate_autoencoder.py --codec bundles/brain_mri_ldm/models/autoencoder.pt \
        --datalist data/healthy_ood/datalist.json --section test --out outputs/ae_eval/ood.json [--max-items 12] \
        [--morphometry]

Each item is read with the codec's own preprocessing (``t1_brain_transforms`` on the grid and spacing its meta
records), encoded, decoded and scored (:mod:`meddiff3d.engine.reconstruction_metrics`). Writes OUT (JSON: per
item, and the mean and SD per ``variant`` of the datalist items -- the out-of-template families of ``synth
--variant out_of_template`` -- and over all) and prints the table. ``--morphometry`` adds the brain and ventricular
volume measured on each input and on its reconstruction (:func:`meddiff3d.evaluation.morphometry.measure_volumes`)
and, for a synthetic cohort whose items carry their true volumes (``covariates_raw``), the correlation of both
measurements with the truth. Bad input: one ``error:`` line, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

NAMES = ("psnr_brain", "ssim_brain", "psnr", "ssim")
VOLUMES = ("ventricular_ml", "brain_ml")


def _r(a: list[float], b: list[float]) -> float:
    return statistics.correlation(a, b) if len(a) >= 3 else float("nan")


def volume_agreement(members: list[dict]) -> dict:
    """Per volume: the mean on the inputs and on their reconstructions, and Pearson r between the two (n >= 3); where
    every member knows its true volume (``<name>_true``, a synthetic cohort's ``covariates_raw``) also the true mean
    and r of each measurement against the truth -- the measurement's own validity, which bounds the rest."""
    out = {}
    for name in VOLUMES:
        source, recon = [m[name] for m in members], [m[f"{name}_recon"] for m in members]
        out[name] = {"mean": statistics.fmean(source), "mean_recon": statistics.fmean(recon), "r": _r(source, recon)}
        if all(f"{name}_true" in m for m in members):
            truth = [m[f"{name}_true"] for m in members]
            out[name].update(mean_true=statistics.fmean(truth), r_true=_r(truth, source),
                             r_true_recon=_r(truth, recon))
    return out


def summarise(rows: list[dict]) -> dict:
    groups: dict[str, list[dict]] = {"all": rows}
    for row in rows:
        groups.setdefault(row["variant"], []).append(row)
    out = {}
    for group, members in groups.items():
        out[group] = {"n": len(members)}
        for name in NAMES:
            values = [m[name] for m in members]
            out[group][name] = {"mean": statistics.fmean(values),
                                "sd": statistics.stdev(values) if len(values) > 1 else 0.0}
        if VOLUMES[0] in members[0]:
            out[group]["volumes"] = volume_agreement(members)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--section", default="validation")
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--max-items", type=int, default=0, help="score at most this many items (0: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--morphometry", action="store_true", help="also brain / ventricular volume of input and output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from tqdm import tqdm

    from meddiff3d.data.datalist import load_datalist, read_datalist
    from meddiff3d.data.transforms import t1_brain_transforms
    from meddiff3d.errors import InputError
    from meddiff3d.engine.reconstruction_metrics import reconstruction_scores
    from meddiff3d.evaluation.morphometry import MEASURED_COVARIATES, atlas_for, measure_volumes
    from meddiff3d.models.loading import load_model
    from meddiff3d.pipelines.preflight import output_file

    try:
        output_file(args.out, "--out")
        codec = load_model(args.codec, "codec", device=args.device)
        image = codec.meta["image"]
        items = load_datalist(args.datalist, args.section, modalities=1, check_images="header")
        if args.max_items:
            items = items[: args.max_items]
        if not items:
            raise InputError(f"{args.datalist}: section {args.section!r} has no items")
        doc = read_datalist(args.datalist)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    transform = t1_brain_transforms(image["spacing"], image["shape"], train=False)
    rows, start = [], time.perf_counter()
    with torch.no_grad():
        for item in tqdm(items, desc="reconstruct", unit="volume"):
            x = transform(dict(item))["image"].as_tensor().float()[None].to(args.device)
            x_hat = codec.network.decode(codec.network.encode(x))
            scores = reconstruction_scores(x_hat, x)
            rows.append({"id": item.get("id"), "variant": item.get("variant", "standard"),
                         **{k: round(v, 4) for k, v in scores.items()}})
            if args.morphometry:
                atlas = atlas_for(doc, item)
                source, recon = (measure_volumes(v[0, 0].float().cpu().numpy(), image["spacing"], atlas=atlas)
                                 for v in (x, x_hat))
                rows[-1].update({f"{n}{tag}": round(m[n], 3) for n in VOLUMES
                                 for tag, m in (("", source), ("_recon", recon))})
                known = item.get("covariates_raw") or {}
                rows[-1].update({f"{key}_true": float(known[name]) for name, key in MEASURED_COVARIATES.items()
                                 if name in known})
    summary = summarise(rows)
    result = {"codec": str(args.codec), "codec_sha256": codec.sha256, "datalist": str(args.datalist),
              "section": args.section, "seconds": round(time.perf_counter() - start, 1), "summary": summary,
              "items": rows}
    from meddiff3d.utils.io import save_json

    save_json(result, args.out)
    print(f"{'group':<12}{'n':>4}" + "".join(f"{n:>20}" for n in NAMES))
    for group, s in summary.items():
        print(f"{group:<12}{s['n']:>4}" + "".join(f"{s[n]['mean']:>12.3f} +/- {s[n]['sd']:<5.3f}" for n in NAMES))
        for name, v in s.get("volumes", {}).items():
            print(f"{'':<16}{name}: input {v['mean']:.1f}, reconstruction {v['mean_recon']:.1f}, r {v['r']:.3f}"
                  + (f"; true {v['mean_true']:.1f}, r with the truth: input {v['r_true']:.3f}, reconstruction "
                     f"{v['r_true_recon']:.3f}" if "r_true" in v else ""))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
