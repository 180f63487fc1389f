"""Retrain the brain_mri_ldm demo weights: the bundle's two training commands with its demo preset, and a record.

    .venv/bin/python scripts/train_brain_ldm_demo.py [--stage autoencoder|diffusion|all] [--work data/brain_demo]
        [--threads N] [--install]

The recipe is the bundle's, not this script's: each stage is

    python -m monai.bundle run --config_file "['configs/common.yaml','configs/train_<stage>.yaml',
        'configs/data/synthetic_healthy.yaml','configs/presets/demo.yaml']" --bundle_root WORK

(bundles/brain_mri_ldm/docs/README.md, "Retrain the demo weights"), run in this process on the bundle's configs with
WORK as the bundle root and run_dir / data_dir under WORK, so the cohort (WORK/data/), the runs (WORK/runs/,
resumed after a kill) and the weights (WORK/models/) stay out of the repository. This script only orchestrates: it
keeps the stages' summaries in WORK/demo_training.json (the model card quotes them) and, with ``--install``, copies
WORK/models/{autoencoder,model}.pt and the record into the bundle's models/ and the weights into
brain_mri_anomaly_ldm's models/ (the same pair).
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
STAGES = {"autoencoder": "train_autoencoder.yaml", "diffusion": "train_diffusion.yaml"}


def run_stage(stage: str, work: Path, **overrides) -> dict:
    """One bundle training command with the demo preset, bundle root ``work``; its summary with the wall time."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE / "configs"
    files = [configs / "common.yaml", configs / STAGES[stage], configs / "data" / "synthetic_healthy.yaml",
             configs / "presets" / "demo.yaml"]
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
    for stage in STAGES if args.stage == "all" else [args.stage]:
        record[stage] = run_stage(stage, work)
        record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.install:
        for models in (BUNDLE / "models", ANOMALY_MODELS):
            for name in ("autoencoder.pt", "model.pt"):
                shutil.copyfile(work / "models" / name, models / name)
        shutil.copyfile(record_path, BUNDLE / "models" / "demo_training.json")
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
