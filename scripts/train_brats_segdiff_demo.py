"""Train the brats_mri_segdiff demo weights on the synthetic BraTS-like cohort, reproducibly and resumably.

    .venv/bin/python scripts/train_brats_segdiff_demo.py [--stage cohort|train|all] [--work data/brats_segdiff_demo]
        [--subjects 40] [--iterations 2000] [--threads 2] [--install]

Stages (a killed stage resumes from its last checkpoint; a finished one is skipped):
  cohort  `meddiff3d synth brats --n 40 --seed 0 --source procedural` on the coarse 2 mm grid (80x112x80 over the
          160x224x160 mm box), split 60/20/20 training/validation/test
  train   the tiny_cpu U-Net (0.73 M parameters, no attention) on 48^3 patches (70 % centred on tumour), batch 2,
          v-prediction, linear betas T = 1000, EMA 0.995 -> WORK/model.pt

The figures of the run (iterations, wall time, loss) go to WORK/demo_training.json; `--install` copies model.pt and
that record into bundles/brats_mri_segdiff/models/. Held-out Dice/HD95 come from the bundle's inference + evaluate
configs on the test split (see the bundle README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bundles" / "brats_mri_segdiff" / "models"
SHAPE, SPACING = (80, 112, 80), (2.0, 2.0, 2.0)


def stage_cohort(work: Path, n: int) -> Path:
    from meddiff3d.pipelines.data import synthetic_datalist

    return Path(synthetic_datalist(work / "cohort", kind="brats", n=n, seed=0, shape=SHAPE, source="procedural",
                                   val_fraction=0.2, test_fraction=0.2))


def stage_train(work: Path, datalist: Path, iterations: int, checkpoint_every: int) -> dict:
    from meddiff3d.pipelines.seg_training import train_segmentation_diffusion

    start = time.perf_counter()
    summary = train_segmentation_diffusion(
        datalist, work / "run", out=work / "model.pt", network="tiny_cpu", spacing=SPACING, shape=SHAPE,
        patch_size=(48, 48, 48), foreground_prob=0.7, prediction="v", batch_size=2, max_iterations=iterations,
        lr=2e-3, lr_warmup=50, ema_decay=0.995, amp="none", device="cpu", seed=0, checkpoint_every=checkpoint_every,
        log_every=25,
    )  # fmt: skip
    summary["wall_time_s"] = round(time.perf_counter() - start, 1)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["cohort", "train", "all"], default="all")
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "brats_segdiff_demo")
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--install", action="store_true", help="copy the trained model into the bundle's models/")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    record_path = work / "demo_training.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    datalist = stage_cohort(work, args.subjects)
    record["cohort"] = {"datalist": str(datalist), "subjects": args.subjects, "shape": list(SHAPE),
                        "spacing_mm": list(SPACING), "source": "procedural", "seed": 0}
    if args.stage in ("train", "all"):
        record["train"] = stage_train(work, datalist, args.iterations, args.checkpoint_every)
    record_path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    if args.install:
        MODELS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "model.pt", MODELS / "model.pt")
        shutil.copyfile(record_path, MODELS / "demo_training.json")
    print(json.dumps(record, indent=2, default=str))


if __name__ == "__main__":
    main()
