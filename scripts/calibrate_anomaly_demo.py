"""Demo calibration of brain_mri_anomaly_ldm on its demo pairs (healthy-only models: the KL or the VQ-VAE pair).

    python scripts/calibrate_anomaly_demo.py [--pair kl|vq] [--n 40] [--seed 1000] [--max-val N] [--max-test N]
        [--shape 160 224 160] [--ood-n N]

1. writes the synthetic anomaly cohort (``meddiff3d synth anomaly --source mni``; 30% validation = healthy, 70% test
   = tumour / multifocal / dark / none in turn) to ``data/anomaly_demo`` (reused when it exists with the same request);
2. calibrates the diffusion detector and the autoencoder baseline on the healthy validation volumes into
   ``OUT/{calibration,calibration_autoencoder}.json`` (OUT: ``bundles/brain_mri_anomaly_ldm/models/demo/`` for the KL
   pair, ``.../models/vq/`` for the VQ-VAE pair);
3. evaluates both on the test split into ``OUT/evaluation/``
   (per_volume.csv, summary.csv, metrics.json) and times one detection (seconds, peak RSS) into ``demo_run.json``;
4. with ``--ood-n N`` also on an out-of-template anomaly cohort (``synth anomaly --variant out_of_template``: the
   asymmetric, contrast and phantom families in turn, every lesion kind, seed ``--ood-seed``) into
   ``OUT/evaluation_ood/`` (``metrics.json`` ``by_variant``: per family the healthy volumes' flagged fraction,
   Dice, AUPRC).

Models: ``--pair kl`` (default) ``bundles/brain_mri_anomaly_ldm/models/{autoencoder,model}.pt`` (copies of
brain_mri_ldm's), written to ``models/demo/``; ``--pair vq`` the VQ-VAE pair ``models/vq/{autoencoder,model}.pt``,
written to ``models/vq/`` (where configs/vq_models.yaml reads the calibration); --codec / --diffusion / --out override
them (e.g. an older pair in data/brain_demo). Detector settings: the bundle's configs/calibrate.yaml unless
--settings JSON.
Smoke test: ``--shape 160 224 160 --n 4 --max-val 1 --max-test 1``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brain_mri_anomaly_ldm"
MODELS = BUNDLE / "models"
#: --pair -> (codec, diffusion model, output folder of the calibration and its record)
PAIRS = {"kl": (MODELS / "autoencoder.pt", MODELS / "model.pt", MODELS / "demo"),
         "vq": (MODELS / "vq" / "autoencoder.pt", MODELS / "vq" / "model.pt", MODELS / "vq")}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40, help="subjects in the synthetic anomaly cohort")
    p.add_argument("--seed", type=int, default=1000, help="cohort seed (not the seed of the models' training cohort)")
    p.add_argument("--shape", type=int, nargs=3, default=[160, 224, 160])
    p.add_argument("--data", type=Path, default=ROOT / "data" / "anomaly_demo")
    p.add_argument("--pair", choices=sorted(PAIRS), default="kl",
                   help="the shipped demo pair whose files --codec / --diffusion / --out default to")
    p.add_argument("--codec", type=Path, default=None, help="codec file (default: the --pair's autoencoder.pt)")
    p.add_argument("--diffusion", type=Path, default=None, help="U-Net file (default: the --pair's model.pt)")
    p.add_argument("--out", type=Path, default=None,
                   help="calibration and record folder (default: the --pair's, models/demo or models/vq; "
                        "required with --codec or --diffusion)")
    p.add_argument("--settings", type=json.loads, default=None, help="detector settings as JSON (default: calibrate.yaml)")
    p.add_argument("--ood-n", type=int, default=0, help="subjects of the out-of-template evaluation cohort (0: none)")
    p.add_argument("--ood-seed", type=int, default=2000)
    p.add_argument("--ood-data", type=Path, default=ROOT / "data" / "anomaly_ood")
    p.add_argument("--max-val", type=int, default=None)
    p.add_argument("--max-test", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="auto")
    args = p.parse_args(argv)
    if (args.codec or args.diffusion) and args.out is None:
        p.error("--out is required with --codec or --diffusion (the default folder holds the shipped calibration)")
    codec, diffusion, out = PAIRS[args.pair]
    args.codec, args.diffusion, args.out = args.codec or codec, args.diffusion or diffusion, args.out or out
    return args


def bundle_detector_settings() -> dict:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(BUNDLE / "configs" / "common.yaml"), str(BUNDLE / "configs" / "calibrate.yaml")])
    return parser.get_parsed_content("detector")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from meddiff3d.errors import find_input_error
    from meddiff3d.evaluation.anomaly import evaluate_anomaly
    from meddiff3d.pipelines.anomaly import calibrate_anomaly, detect_anomalies
    from meddiff3d.pipelines.benchmark import peak_rss_mb
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.utils.io import save_json

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    try:
        request = {"n": args.n, "seed": args.seed, "shape": args.shape, "source": "mni", "val": 0.3, "test": 0.7}
        stamp = args.data / "request.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == request):
            stamp.unlink(missing_ok=True)
            write_cohort("anomaly", args.data, args.n, seed=args.seed, shape=tuple(args.shape), source="mni",
                         val_fraction=0.3, test_fraction=0.7)
            save_json(request, stamp)
        datalist = args.data / "datalist.json"
        settings = args.settings or bundle_detector_settings()
        cal, cal_ae = args.out / "calibration.json", args.out / "calibration_autoencoder.json"
        t0 = time.perf_counter()
        calibration = calibrate_anomaly(args.codec, args.diffusion, datalist, cal, settings=settings,
                                        max_volumes=args.max_val, baseline_out=cal_ae, device=args.device,
                                        amp=args.amp)
        t1 = time.perf_counter()
        metrics = evaluate_anomaly(args.codec, args.diffusion, {"diffusion": cal, "autoencoder": cal_ae}, datalist,
                                   args.out / "evaluation", max_volumes=args.max_test, device=args.device,
                                   amp=args.amp)
        t2 = time.perf_counter()
        first_test = json.loads(datalist.read_text())["test"][0]
        t3 = time.perf_counter()
        example = detect_anomalies(args.codec, args.diffusion, cal, [str(args.data / first_test["image"])],
                                   args.out / "example_outputs", device=args.device, amp=args.amp, progress=False)
        example_seconds = time.perf_counter() - t3
        ood = None
        if args.ood_n:
            ood_request = {"n": args.ood_n, "seed": args.ood_seed, "shape": args.shape, "source": "mni",
                           "variant": "out_of_template", "test": 1.0}
            ood_stamp = args.ood_data / "request.json"
            if not (ood_stamp.is_file() and json.loads(ood_stamp.read_text()) == ood_request):
                ood_stamp.unlink(missing_ok=True)
                write_cohort("anomaly", args.ood_data, args.ood_n, seed=args.ood_seed, shape=tuple(args.shape),
                             source="mni", val_fraction=0.0, test_fraction=1.0, variant="out_of_template")
                save_json(ood_request, ood_stamp)
            ood = evaluate_anomaly(args.codec, args.diffusion, {"diffusion": cal, "autoencoder": cal_ae},
                                   args.ood_data / "datalist.json", args.out / "evaluation_ood", device=args.device,
                                   amp=args.amp)
    except Exception as err:  # noqa: BLE001
        user_error = find_input_error(err)
        if user_error is None:
            raise
        print(f"error: {user_error}", file=sys.stderr)
        return 2
    per_volume = [r for r in metrics["per_volume"] if r["method"] == "diffusion"]
    run = {"cohort": request, "settings": settings, "calibration": calibration,
           "calibration_seconds": round(t1 - t0, 1), "evaluation_seconds": round(t2 - t1, 1),
           "detection_seconds_per_volume": {m: round(sum(r["seconds"] for r in metrics["per_volume"]
                                                         if r["method"] == m) / max(1, len(per_volume)), 2)
                                            for m in metrics["methods"]},
           "peak_rss_mb": round(peak_rss_mb(), 1), "threads": torch.get_num_threads(),
           "summary": {m: k.get("all") for m, k in metrics["methods"].items()},
           "example": {"case": example[0], "seconds_with_loading": round(example_seconds, 1)},
           "out_of_template": None if ood is None else {
               "cohort": ood_request, "by_variant": ood["by_variant"],
               "summary": {m: k.get("all") for m, k in ood["methods"].items()}}}
    save_json(run, args.out / "demo_run.json")
    print(json.dumps(run["summary"], indent=1))
    print(f"calibration {run['calibration_seconds']} s, evaluation {run['evaluation_seconds']} s, "
          f"per volume {run['detection_seconds_per_volume']}, peak RSS {run['peak_rss_mb']} MB -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
