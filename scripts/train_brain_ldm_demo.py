"""Retrain the brain_mri_ldm demo weights: the bundle's two training commands with its demo preset, and a record.

    .venv/bin/python scripts/train_brain_ldm_demo.py [--stage autoencoder|diffusion|all|flow|distillation]
        [--work data/brain_demo] [--threads N] [--install]

The recipe is the bundle's, not this script's: each stage is

    python -m monai.bundle run --config_file "['configs/common.yaml','configs/train_<stage>.yaml',
        'configs/data/synthetic_healthy.yaml','configs/presets/demo.yaml']" --bundle_root WORK

(bundles/brain_mri_ldm/docs/README.md, "Retrain the demo weights"; the stages ``flow`` and ``distillation`` merge
``configs/presets/demo_flow.yaml`` / ``demo_distill.yaml`` after it and write models/model_flow.pt /
models/model_distilled.pt, the distillation from WORK/models/model.pt), run in this process on the bundle's configs with
WORK as the bundle root and run_dir / data_dir under WORK, so the cohort (WORK/data/), the runs (WORK/runs/,
resumed after a kill) and the weights (WORK/models/) stay out of the repository. This script only orchestrates: it
keeps the stages' summaries in WORK/demo_training.json (the model card quotes them) and, with ``--install``, copies
the trained files and the record into the bundle's models/, the pair also into brain_mri_anomaly_ldm's models/.
Before the distillation stage it copies the diffusion run's latent cache (WORK/runs/diffusion/latents/) into the
distillation run when that has none: the same codec and datalist, so the encoder's cache key matches and the cohort
is not encoded twice (a cache whose key differs is encoded again, as always).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brain_mri_ldm"
ANOMALY_MODELS = ROOT / "bundles" / "brain_mri_anomaly_ldm" / "models"
#: stage -> (training config, presets merged after presets/demo.yaml); "all" trains the shipped pair (the first two)
STAGES = {"autoencoder": ("train_autoencoder.yaml", ()), "diffusion": ("train_diffusion.yaml", ()),
          "flow": ("train_diffusion.yaml", ("demo_flow.yaml",)),  # -> models/model_flow.pt
          "distillation": ("train_distillation.yaml", ("demo_distill.yaml",))}  # -> models/model_distilled.pt
PAIR = ("autoencoder", "diffusion")
#: what --install copies into brain_mri_ldm/models/ after a stage (the pair also into brain_mri_anomaly_ldm's)
INSTALLS = {"autoencoder": "autoencoder.pt", "diffusion": "model.pt", "flow": "model_flow.pt",
            "distillation": "model_distilled.pt"}


def run_stage(stage: str, work: Path, **overrides) -> dict:
    """One bundle training command with the demo preset, bundle root ``work``; its summary with the wall time."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE / "configs"
    config, presets = STAGES[stage]
    files = [configs / "common.yaml", configs / config, configs / "data" / "synthetic_healthy.yaml",
             configs / "presets" / "demo.yaml", *[configs / "presets" / p for p in presets]]
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=[str(f) for f in files], workflow_type="train",
                              meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                              bundle_root=str(work), run_dir=str(work / "runs"),
                              data_dir=str(work / "data" / "synthetic_healthy"), **overrides)
    workflow.initialize()
    (summary,) = workflow.run()
    workflow.finalize()
    return {**summary, "wall_time_s": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "brain_demo")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--install", action="store_true", help="copy the trained files into the bundles' models/")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "demo_training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    stages = PAIR if args.stage == "all" else [args.stage]
    cached, target = work / "runs" / "diffusion" / "latents", work / "runs" / "distillation" / "latents"
    for stage in stages:
        if stage == "distillation" and (cached / "latents.pt").is_file() and not target.exists():
            shutil.copytree(cached, target)
        record[stage] = run_stage(stage, work)
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.install:
        for stage in stages:
            name = INSTALLS[stage]
            for models in (BUNDLE / "models", ANOMALY_MODELS) if stage in PAIR else (BUNDLE / "models",):
                shutil.copyfile(work / "models" / name, models / name)
        shipped = BUNDLE / "models" / "demo_training.json"  # the installed stages' records replace theirs only
        merged = {**(json.loads(shipped.read_text()) if shipped.exists() else {}), **{s: record[s] for s in stages}}
        shipped.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
