"""Quality versus sampling steps of a trained brain_mri_ldm generator, with seed-to-seed spread.

    python scripts/quality_vs_steps.py --codec MODELS/autoencoder.pt --diffusion MODELS/model.pt \
        --datalist DATALIST --out OUT [--configs ddim:50 dpmpp_2m:10 unipc:8 dpmpp_2m:8:time_quadratic ...] \
        [--seeds 3] [--conditions 4] [--n-per-condition 3] [--reference ddim:50]

Each configuration ``[MODEL/]sampler:steps[:spacing]`` (spacing: the sampler's default unless given; MODEL: a name
given with ``--model NAME=PATH``, e.g. a distilled student or a flow model beside the ``--diffusion`` model, which
unprefixed configurations and the reference use) is evaluated ``--seeds`` times with
:func:`meddiff3d.evaluation.evaluate` (the metrics of scripts/evaluate_brain_ldm.py: Frechet distances to held-out
volumes on the fixed random CNN and on hand-crafted features, conditioning fidelity r / MAE for ventricular and brain volume, MS-SSIM between samples,
near-copies of training subjects), on the same held-out conditions, with disjoint seeds (seed index j uses base seed
``200000 j``, so no two runs share a sample). The real volumes are measured once for the whole sweep.

Also reported, not part of the verdict: the paired in-brain RMSE of each sample to the reference's sample from the
same noise and condition, relative to the RMSE between two reference samples of one condition (how far the sampler
moves a sample, against how far another seed moves it).

A configuration is of **equal quality** when no metric's mean over seeds is worse than the reference's
(``--reference``, DDIM-50 by default) by more than 2 of the reference's standard deviations over seeds (ddof 1):
Frechet distances, MAE and near-copies worse when higher, r when lower, MS-SSIM when further from the MS-SSIM between
training subjects (the data's diversity). Metrics beyond the spread on the good side are named, not held against it.
The fastest such configuration (fewest denoiser evaluations) is printed as the recommended default.

Resumable: OUT/[<model>/]<sampler>-<steps>[-<spacing>]/seed<j>/evaluation.json is reused when present, and the real
volumes' measurements are kept in OUT/reference/ (arrays in ``.npz`` without pickles, the rest JSON; reused while the datalist file is
unchanged), so a configuration added later costs only its own samples. Writes OUT/quality_vs_steps.json and
OUT/quality_vs_steps.md (the table the model card quotes).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CONFIGS = ("ddim:50", "ddim:20", "dpmpp_2m:20", "dpmpp_2m:10", "dpmpp_2m:8")
SEED_STRIDE = 200_000  # evaluate() uses seed + 1000 k + i (conditional) and seed + 100000 + i (unconditional)
#: metric -> (path in evaluation.json, which way is better: "low", "high" or "data" = nearer the training data's value)
METRICS = {
    "fd_cnn": (("realism", "fd_random_cnn", "generated_vs_held_out", "fd"), "low"),
    "fd_hand": (("realism", "fd_handcrafted", "generated_vs_held_out", "fd"), "low"),
    "r_ventricles": (("conditioning", "conditional", "ventricular_volume", "r"), "high"),
    "r_brain": (("conditioning", "conditional", "brain_volume", "r"), "high"),
    "mae_ventricles": (("conditioning", "conditional", "ventricular_volume", "mae"), "low"),
    "mae_brain": (("conditioning", "conditional", "brain_volume", "mae"), "low"),
    "ms_ssim": (("diversity_ms_ssim", "generated_all_pairs", "mean"), "data"),
    "near_copies": (("memorisation", "n_flagged"), "low"),
}
#: the MS-SSIM between training subjects: the diversity the samples should have ("data" above)
DATA_MS_SSIM = ("diversity_ms_ssim", "training_pairs", "mean")


def parse_config(text: str) -> tuple[str, int, str | None]:
    """``[MODEL/]SAMPLER:STEPS[:SPACING]`` -> ``(sampler, steps, spacing or None = the sampler's default)``."""
    text = split_model(text)[1]
    sampler, steps, spacing = (text.split(":") + [None])[:3] if text.count(":") in (1, 2) else ("", "", None)
    if not sampler or not steps.isdigit() or int(steps) < 1 or spacing == "":
        raise ValueError(f"configuration {text!r} is not SAMPLER:STEPS[:SPACING] (e.g. dpmpp_2m:10)")
    return sampler, int(steps), spacing


def split_model(config: str) -> tuple[str | None, str]:
    """``[MODEL/]REST`` -> ``(MODEL or None = the --diffusion model, REST)``."""
    model, _, rest = config.rpartition("/")
    return model or None, rest


def model_of(config: str) -> str | None:
    """The ``MODEL`` of ``MODEL/SAMPLER:STEPS[:SPACING]`` (``None``: the ``--diffusion`` model)."""
    return split_model(config)[0]


def parse_models(pairs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` pairs -> {name: path}; names are plain words (they become folders under OUT)."""
    models = {}
    for pair in pairs:
        name, _, path = pair.partition("=")
        if not name.isidentifier() or not path:
            raise ValueError(f"--model {pair!r} is not NAME=PATH with NAME a plain word (e.g. student=model.pt)")
        if not Path(path).is_file():
            raise ValueError(f"--model {pair!r}: {path} is not a file")
        models[name] = Path(path)
    return models


def evaluations(sampler: str, steps: int) -> int:
    """Denoiser evaluations of one sample (heun: two per step but the last)."""
    return 2 * steps - 1 if sampler == "heun" else steps


def metric(result: dict, path: tuple[str, ...]) -> float | None:
    value = result
    for key in path:
        value = (value or {}).get(key) if isinstance(value, dict) else None
    return None if value is None else float(value)


def summarise(runs: dict[str, list[dict]], reference: str) -> dict:
    """Mean / std (ddof 1) per metric per configuration, and the equal-quality verdict against ``reference``."""
    table = {}
    for name, results in runs.items():
        row = {}
        for key, (path, _) in METRICS.items():
            values = [v for v in (metric(r, path) for r in results) if v is not None]
            row[key] = {"mean": float(np.mean(values)) if values else None,
                        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                        "values": [round(v, 4) for v in values]}
        table[name] = row
    ref = table[reference]
    data = [v for v in (metric(r, DATA_MS_SSIM) for r in runs[reference]) if v is not None]
    data_ms_ssim = float(np.mean(data)) if data else None
    for name, row in table.items():
        worse, differs = [], []
        for key, (_, better) in METRICS.items():
            m, r_m, r_s = row[key]["mean"], ref[key]["mean"], ref[key]["std"]
            if m is None or r_m is None or r_s is None:
                continue
            margin = 2 * r_s + 1e-12
            if abs(m - r_m) > margin:
                differs.append(key)
            if better == "data" and data_ms_ssim is not None:
                gap = abs(m - data_ms_ssim) - abs(r_m - data_ms_ssim)  # > 0: further from the data than the reference
            else:
                gap = (m - r_m) if better == "low" else (r_m - m) if better == "high" else abs(m - r_m)
            if gap > margin:
                worse.append(key)
        row["worse_than_reference_spread"] = worse
        row["differs_beyond_reference_spread"] = differs
        row["equal_quality"] = not worse
    return table


def markdown(table: dict, order: list[str], reference: str, seeds: int, samples: int,
             paired: dict | None = None) -> str:
    cols = list(METRICS)
    paired = paired or {}
    lines = [f"| configuration | U-Net evaluations | {' | '.join(cols)} | paired RMSE to {reference} "
             f"(/ between seeds) | equal quality |", "|" + "---|" * (len(cols) + 4)]
    for name in order:
        row = table[name]
        sampler, steps, _ = parse_config(name)
        cells = []
        for key in cols:
            m, s = row[key]["mean"], row[key]["std"]
            cells.append("-" if m is None else f"{m:.3f} +/- {s:.3f}" if s is not None else f"{m:.3f}")
        better = [k for k in row["differs_beyond_reference_spread"] if k not in row["worse_than_reference_spread"]]
        verdict = "reference" if name == reference else (
            ("yes" + (f" (better: {', '.join(better)})" if better else "")) if row["equal_quality"] else
            "no (worse: " + ", ".join(row["worse_than_reference_spread"]) + ")")
        pair = paired.get(name)
        pair_cell = "-" if not pair else f"{pair['rmse']:.4f} ({pair['relative_to_between_seeds']:.2f})"
        lines.append(f"| {name} | {evaluations(sampler, steps)} | {' | '.join(cells)} | {pair_cell} | {verdict} |")
    lines.append(f"\nmean +/- SD over {seeds} disjoint seeds, {samples} samples each; equal quality: no metric's mean "
                 f"worse than the {reference} mean by more than 2 {reference} SDs (FD, MAE, near-copies: higher is "
                 f"worse; r: lower; MS-SSIM: further from the training pairs' value); 'better' names metrics beyond "
                 f"the spread on the good side. Paired RMSE: in-brain RMSE to the {reference} sample "
                 f"from the same noise and condition (in parentheses: over the RMSE between two {reference} samples "
                 f"of one condition, {paired.get('between_seeds_rmse', '-')}); not part of the verdict.")
    return "\n".join(lines)


BRAIN_THRESHOLD = 0.1  # in-brain voxels: either volume above this (images are ~[0, 1.3], background ~0)


def _in_brain_rmse(a: np.ndarray, b: np.ndarray) -> float:
    mask = (a > BRAIN_THRESHOLD) | (b > BRAIN_THRESHOLD)
    return float(np.sqrt(np.mean((a[mask] - b[mask]) ** 2))) if mask.any() else float("nan")


def paired_distances(out: Path, reference: str, names: list[str]) -> dict:
    """In-brain RMSE between each configuration's sample and the reference's sample from the same noise and condition
    (the sweep uses the same seeds for every configuration), against the RMSE between two reference samples of one
    condition from different noise: how far the sampler moves a sample, relative to how far another seed moves it.
    Each reference sample is read once."""
    import nibabel as nib

    def load(path: Path) -> np.ndarray:
        return np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)

    ref_root = out / reference.replace(":", "-")
    files = sorted(p.relative_to(ref_root) for p in ref_root.glob("seed*/samples/*/sample_seed*.nii.gz"))
    if not files:
        return {}
    between = []
    for folder in sorted({f.parent for f in files if f.parent.name.startswith("condition")}):
        pair = sorted(f for f in files if f.parent == folder)[:2]
        if len(pair) == 2:
            between.append(_in_brain_rmse(load(ref_root / pair[0]), load(ref_root / pair[1])))
    scale = float(np.nanmean(between)) if between else float("nan")
    values: dict[str, list[float]] = {name: [] for name in names}
    for f in files:
        ref = load(ref_root / f)
        for name in names:
            other = out / name.replace(":", "-") / f
            if other.is_file():
                values[name].append(_in_brain_rmse(ref, load(other)))
    result = {"between_seeds_rmse": round(scale, 4), "samples": len(files)}
    for name, rmse in values.items():
        if rmse:
            mean = float(np.nanmean(rmse))
            result[name] = {"rmse": round(mean, 4), "relative_to_between_seeds": round(mean / scale, 3),
                            "n": len(rmse)}
    return result


ARRAYS = ("cnn", "hand", "nn", "small")


def save_reference(cache: dict, folder: Path) -> None:
    """The evaluation's cached :class:`~meddiff3d.evaluation.generative.RealReference` entries as JSON + ``.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (key, ref) in enumerate(cache.items()):
        arrays, records = {}, {}
        for group, recs in ref.real.items():
            records[group] = []
            for j, r in enumerate(recs):
                records[group].append({"name": r.name, "raw": r.raw, "measured": r.measured, "info": r.info})
                for a in ARRAYS:
                    if getattr(r, a) is not None:
                        arrays[f"{group}_{j}_{a}"] = getattr(r, a)
        np.savez(folder / f"reference{i}.npz", **arrays)
        doc = {"key": key, "records": records, "truth": ref.truth, "held_items": ref.held_items,
               "calibration": ref.calibration.to_dict(), "ceiling": ref.ceiling, "atlas": ref.atlas}
        (folder / f"reference{i}.json").write_text(json.dumps(doc, default=str), encoding="utf-8")


def load_reference(folder: Path) -> dict:
    """The cache :func:`save_reference` wrote (empty when there is none)."""
    from meddiff3d.evaluation.features import RandomConvFeatures
    from meddiff3d.evaluation.generative import RealReference, VolumeRecord
    from meddiff3d.evaluation.morphometry import Calibration

    cache = {}
    for doc_path in sorted(folder.glob("reference*.json")):
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        with np.load(doc_path.with_suffix(".npz"), allow_pickle=False) as arrays:
            real = {group: [VolumeRecord(r["name"], r["raw"], r["measured"],
                                         *[arrays[f"{group}_{j}_{a}"] if f"{group}_{j}_{a}" in arrays else None
                                           for a in ARRAYS], info=r["info"])
                            for j, r in enumerate(recs)] for group, recs in doc["records"].items()}
        cache[doc["key"]] = RealReference(json.loads(doc["key"]), RandomConvFeatures(), real, doc["truth"],
                                          doc["held_items"], Calibration(**doc["calibration"]), doc["ceiling"],
                                          doc.get("atlas", "mni"))
    return cache


def main(argv: list[str] | None = None) -> int:
    from meddiff3d.errors import InputError
    from meddiff3d.evaluation import evaluate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--codec", type=Path, required=True)
    p.add_argument("--diffusion", type=Path, required=True)
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="[MODEL/]SAMPLER:STEPS[:SPACING]")
    p.add_argument("--model", action="append", default=[], metavar="NAME=PATH",
                   help="another diffusion model file, named for MODEL/ configurations (repeatable)")
    p.add_argument("--reference", default="ddim:50")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--conditions", type=int, default=4)
    p.add_argument("--n-per-condition", type=int, default=3)
    p.add_argument("--max-real", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        configs = [parse_config(c) for c in args.configs]
        parse_config(args.reference)
        models = {None: args.diffusion, **parse_models(args.model)}
        unknown = sorted({str(model_of(c)) for c in [*args.configs, args.reference] if model_of(c) not in models})
        if unknown:
            raise ValueError(f"configuration model(s) {', '.join(unknown)} not given with --model NAME=PATH")
        if args.seeds < 2:
            raise ValueError(f"--seeds {args.seeds}: a spread needs at least 2 seeds")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    names = list(args.configs)
    if args.reference not in names:
        names.insert(0, args.reference)
        configs.insert(0, parse_config(args.reference))
    cache = load_reference(args.out / "reference")
    runs: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for (sampler, steps, spacing), name in zip(configs, names):
        runs[name] = []
        for j in range(args.seeds):
            out = args.out / name.replace(":", "-") / f"seed{j}"
            done = out / "evaluation.json"
            if done.is_file():
                runs[name].append(json.loads(done.read_text(encoding="utf-8")))
                continue
            try:
                runs[name].append(evaluate(args.codec, models[model_of(name)], args.datalist, out,
                                           n_per_condition=args.n_per_condition, conditions=args.conditions,
                                           steps=steps, sampler=sampler, timestep_spacing=spacing,
                                           seed=SEED_STRIDE * j,
                                           max_real=args.max_real or None, device=args.device, amp=args.amp,
                                           cache=cache))
                if not any((args.out / "reference").glob("reference*.json")):
                    save_reference(cache, args.out / "reference")
            except InputError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            logging.info("%s seed %d done (%.0f s so far)", name, j, time.perf_counter() - start)
    table = summarise(runs, args.reference)
    samples = int(runs[names[0]][0]["settings"]["n_per_condition"]) * int(runs[names[0]][0]["settings"]["conditions"])
    samples += int(runs[names[0]][0]["settings"]["unconditional_samples"])
    paired = paired_distances(args.out, args.reference, names)
    for name in names:
        table[name]["paired_rmse_to_reference"] = paired.get(name)
    text = markdown(table, names, args.reference, args.seeds, samples, paired)
    fastest = min((n for n in names if table[n]["equal_quality"]), key=lambda n: evaluations(*parse_config(n)[:2]))
    report = {"models": {"codec": str(args.codec), "diffusion": str(args.diffusion),
                         **{k: str(v) for k, v in models.items() if k}}, "datalist": str(args.datalist),
              "reference": args.reference, "seeds": args.seeds, "samples_per_run": samples, "table": table,
              "fastest_equal_quality": fastest, "seconds": round(time.perf_counter() - start, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_vs_steps.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    (args.out / "quality_vs_steps.md").write_text(text + "\n", encoding="utf-8")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # an ASCII console gets "?" for the plus-minus
    print(text.encode(encoding, "replace").decode(encoding))
    print(f"fastest configuration of equal quality: {fastest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
