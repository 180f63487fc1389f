"""Retrain the brats_mri_segdiff demo weights: the bundle's training command with its demo preset, and a record.

    .venv/bin/python scripts/train_brats_segdiff_demo.py [--work data/brats_segdiff_demo] [--threads N] [--install]

The recipe is the bundle's, not this script's:

    python -m monai.bundle run --config_file "['configs/common.yaml','configs/train.yaml',
        'configs/data/synthetic_brats.yaml','configs/presets/demo.yaml']" --bundle_root WORK

(bundles/brats_mri_segdiff/docs/README.md, "Retrain the demo weights"), run in this process on the bundle's configs
with WORK as the bundle root and run_dir / data_dir under WORK, so the cohort (WORK/data/), the run (WORK/runs/,
resumed after a kill) and the weights (WORK/models/model.pt) stay out of the repository. This script only
orchestrates: it keeps the summary in WORK/demo_training.json and, with ``--install``, copies model.pt and that
record into the bundle's models/. Held-out Dice/HD95 come from the bundle's inference + evaluate configs on the
test split (see the bundle README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brats_mri_segdiff"


def run_training(work: Path, **overrides) -> dict:
    """The bundle's training command with the demo preset, bundle root ``work``: its summary with the wall time."""
    from monai.bundle import ConfigWorkflow

    configs = BUNDLE / "configs"
    files = [configs / "common.yaml", configs / "train.yaml", configs / "data" / "synthetic_brats.yaml",
             configs / "presets" / "demo.yaml"]
    start = time.perf_counter()
    workflow = ConfigWorkflow(config_file=[str(f) for f in files], workflow_type="train",
                              meta_file=str(configs / "metadata.json"), logging_file=str(configs / "logging.conf"),
                              bundle_root=str(work), run_dir=str(work / "runs"),
                              data_dir=str(work / "data" / "synthetic_brats"), **overrides)
    workflow.initialize()
    datalist = workflow.parser.get_parsed_content("datalist")
    (summary,) = workflow.run()
    workflow.finalize()
    cohort = {key: workflow.parser.get_parsed_content(key) for key in ("synthetic_n", "synthetic_seed",
                                                                         "synthetic_variant", "image_shape", "spacing")}
    return {"cohort": {"datalist": str(datalist), **cohort},
            "train": {**summary, "wall_time_s": round(time.perf_counter() - start, 1)}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "brats_segdiff_demo")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--install", action="store_true", help="copy the trained model into the bundle's models/")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    record = run_training(work)
    record_path = work / "demo_training.json"
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.install:
        shutil.copyfile(work / "models" / "model.pt", BUNDLE / "models" / "model.pt")
        shutil.copyfile(record_path, BUNDLE / "models" / "demo_training.json")
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
