"""Benchmark: the MONAI model-zoo brain LDM inference loop vs meddiff3d ``generate`` on the same weights.

    python scripts/bench_brain_ldm.py --out bench.json            # full size: 160x224x160, anchor architectures
    python scripts/bench_brain_ldm.py --out bench.json --quick    # smoke run: 64^3 images, tiny networks

One pair of random-weight (seeded) model files of the anchor architecture is written once (``untrained_pair`` with the
``anchor`` autoencoder and U-Net presets; the U-Net's zero-initialised output layers are perturbed so its output is
non-trivial). Each configuration then generates one volume in a fresh subprocess that reports its own peak RSS
(``ru_maxrss``); a child killed by the OOM killer reports "does not fit", one over ``--timeout`` "timeout":

* ``reference``: written against MONAI only, as the model-zoo bundle does it -- ``DDIMScheduler`` (scaled-linear betas
  0.0015-0.0205, T = 1000, ``clip_sample=False``, ``set_timesteps(steps)``), a loop of ``scheduler.step`` over
  ``scheduler.timesteps`` feeding ``cat(latent, covariate channels)`` plus the covariates as cross-attention context,
  fp32, then ``decode_stage_2_outputs`` of the whole latent (scale 1).
* ``ours_ddim``: ``meddiff3d.pipelines.generation.generate`` with DDIM at the same steps, ``spacing="monai"`` (MONAI's
  stepping, so the result is comparable), ``amp="auto"`` (bf16 on CPUs with native bf16), whole-volume decode
  (exact; ``--decode-split N`` to decode in slabs instead).
* ``ours_ddim_tiled``: ``ours_ddim`` with tiled decoding (``--tile``, see ``ours_dpmpp_tiled``).
* ``ours_dpmpp``: the same with DPM-Solver++(2M) at ``--dpm-steps`` steps (its default log-SNR spacing).
* ``ours_dpmpp_tiled``: ``ours_dpmpp`` with tiled decoding (``--tile``, latent tiles, Gaussian blending): bounded
  memory, approximate (GroupNorm statistics per tile); its difference to ``ours_dpmpp`` measures the approximation.
* ``ours_fp32``: ``ours_ddim`` with ``amp="none"``: must agree with the reference to float rounding.

Same initial noise everywhere: ``generate`` draws the seed's noise from ``torch.Generator().manual_seed(seed)``, the
reference draws the same tensor the same way. Times are wall-clock seconds in the child, from reading the model files
to the decoded volume (``ours_*`` include ``generate``'s NIfTI/PNG/JSON writing; the reference writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

CONFIGS = ("reference", "ours_ddim", "ours_ddim_tiled", "ours_dpmpp", "ours_dpmpp_tiled", "ours_fp32")
COVARIATES = {"sex": 1.0, "age": 0.5, "ventricular_volume": 0.3, "brain_volume": 0.6}  # model-zoo order
FULL = {"shape": [160, 224, 160], "autoencoder": "anchor", "unet": "anchor"}
QUICK = {"shape": [64, 64, 64], "autoencoder": "tiny", "unet": "test"}


# ------------------------------------------------------------------------------------------------ children
def run_reference(models: Path, steps: int, seed: int, out: Path) -> dict:
    """The model-zoo sampler, against MONAI only: DDIMScheduler loop in fp32 + whole-volume decode."""
    import torch
    from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
    from monai.networks.schedulers import DDIMScheduler

    t0 = time.perf_counter()
    codec_file = torch.load(models / "codec.pt", map_location="cpu", weights_only=True)
    diffusion_file = torch.load(models / "diffusion.pt", map_location="cpu", weights_only=True)
    weights = codec_file["weights"]
    if float(weights["latent_scale"]) != 1.0 or float(weights["latent_shift"]) != 0.0:
        raise SystemExit("the reference decodes raw latents: the codec must have latent scale 1 and shift 0")
    autoencoder = AutoencoderKL(**codec_file["meta"]["network"]["args"])
    autoencoder.load_state_dict({k.removeprefix("autoencoder."): v for k, v in weights.items()
                                 if k.startswith("autoencoder.")})
    meta = diffusion_file["meta"]
    unet = DiffusionModelUNet(**meta["network"]["args"])
    unet.load_state_dict(diffusion_file["ema"])
    autoencoder.eval(), unet.eval()
    del codec_file, diffusion_file
    sched = meta["schedule"]
    scheduler = DDIMScheduler(num_train_timesteps=sched["num_train_timesteps"], schedule=sched["schedule"],
                              beta_start=sched["beta_start"], beta_end=sched["beta_end"], clip_sample=False)
    scheduler.set_timesteps(num_inference_steps=steps)
    conditioning = torch.tensor([[COVARIATES[n] for n in meta["conditioning"]["covariates"]]]).unsqueeze(1)
    noise = torch.randn((1, *meta["latent"]["shape"]), generator=torch.Generator().manual_seed(seed))
    t1 = time.perf_counter()
    with torch.no_grad():
        image = noise
        cond_concat = conditioning.squeeze(1)[:, :, None, None, None].expand(-1, -1, *noise.shape[2:])
        for t in scheduler.timesteps:
            eps = unet(torch.cat((image, cond_concat), dim=1), timesteps=torch.Tensor((t,)).long(),
                       context=conditioning)
            image, _ = scheduler.step(eps, t, image)
        t2 = time.perf_counter()
        volume = autoencoder.decode_stage_2_outputs(image)
    t3 = time.perf_counter()
    np.save(out, volume[0, 0].float().numpy())
    return {"load_s": t1 - t0, "sampling_s": t2 - t1, "decoding_s": t3 - t2, "total_s": t3 - t0}


def run_ours(models: Path, steps: int, seed: int, out: Path, *, sampler: str, amp: str, spacing: str | None,
             decode_split: int | None, decode_tile: list[int] | None) -> dict:
    import nibabel as nib

    from meddiff3d.pipelines.generation import generate

    t0 = time.perf_counter()
    paths = generate(models / "codec.pt", models / "diffusion.pt", covariates=COVARIATES, sampler=sampler,
                     steps=steps, seed=seed, output_dir=out.parent / out.stem, amp=amp, spacing=spacing,
                     decode_split=decode_split, decode_tile=decode_tile, progress=False, device="cpu")
    total = time.perf_counter() - t0
    sidecar = json.loads(paths[0].with_name(paths[0].name.replace(".nii.gz", ".json")).read_text())
    np.save(out, np.asarray(nib.load(paths[0]).dataobj, dtype=np.float32))
    return {"sampling_s": sidecar["seconds"]["sampling"], "decoding_s": sidecar["seconds"]["decoding"],
            "total_s": total, "amp": sidecar["amp"], "timestep_spacing": sidecar["timestep_spacing"]}


def child(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models, out = args.workdir / "models", args.workdir / f"{args.child}.npy"
    if args.child == "reference":
        result = run_reference(models, args.steps, args.seed, out)
    else:
        sampler = "dpmpp_2m" if args.child.startswith("ours_dpmpp") else "ddim"
        result = run_ours(models, args.dpm_steps if sampler == "dpmpp_2m" else args.steps, args.seed, out,
                          sampler=sampler, amp="none" if args.child == "ours_fp32" else "auto",
                          spacing=None if sampler == "dpmpp_2m" else "monai", decode_split=args.decode_split or None,
                          decode_tile=args.tile if args.child.endswith("_tiled") else None)
    from meddiff3d.pipelines.benchmark import peak_rss_mb

    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    print("RESULT " + json.dumps({**result, "peak_rss_mb": round(peak_rss_mb(), 1),
                                  "threads": torch.get_num_threads()}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent
def make_models(workdir: Path, shape: list[int], autoencoder: str, unet: str, seed: int) -> float:
    from meddiff3d.models.autoencoder import autoencoder_spec
    from meddiff3d.pipelines.benchmark import untrained_pair

    t0 = time.perf_counter()
    untrained_pair(workdir / "models", shape=shape, spacing=(1.0, 1.0, 1.0),
                   autoencoder=autoencoder_spec("kl", autoencoder), unet=unet, seed=seed)
    return time.perf_counter() - t0


def spawn(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", str(args.workdir),
           "--steps", str(args.steps), "--dpm-steps", str(args.dpm_steps), "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.decode_split and args.decode_split > 1:
        cmd += ["--decode-split", str(args.decode_split)]
    if args.tile:
        cmd += ["--tile", *map(str, args.tile)]
    from meddiff3d.pipelines.benchmark import run_child

    load = os.getloadavg()[0]
    return {**run_child(cmd, timeout=args.timeout), "load_avg_before": load}


def agreement(workdir: Path, name: str, against: str = "reference") -> dict | None:
    ref, ours = workdir / f"{against}.npy", workdir / f"{name}.npy"
    if not (ref.is_file() and ours.is_file()):
        return None
    a, b = np.load(ref).astype(np.float64), np.load(ours).astype(np.float64)
    diff = np.abs(a - b)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "reference_std": float(a.std()), "reference_range": [float(a.min()), float(a.max())]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def parent(args: argparse.Namespace) -> int:
    import torch

    from meddiff3d.engine.precision import cpu_has_bf16

    preset = QUICK if args.quick else FULL
    shape = args.shape or preset["shape"]
    autoencoder, unet = args.autoencoder or preset["autoencoder"], args.unet or preset["unet"]
    args.tile = args.tile or ([4, 4, 4] if args.quick else [12, 16, 12])
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"writing random-weight models ({autoencoder} autoencoder, {unet} U-Net, {shape}) ...", flush=True)
    make_s = make_models(args.workdir, shape, autoencoder, unet, args.seed)
    results: dict[str, dict] = {}
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        results[name] = spawn(name, args)
        print(f"  {json.dumps(results[name])}", flush=True)
        args.out.write_text(json.dumps({"partial": True, "results": results}, indent=2))
    ref = results.get("reference", {})
    for name, r in results.items():
        if name != "reference" and r.get("status") == "ok" and ref.get("status") == "ok":
            r["speedup_vs_reference"] = round(ref["total_s"] / r["total_s"], 2)
            r["sampling_speedup_vs_reference"] = round(ref["sampling_s"] / max(r["sampling_s"], 1e-9), 2)
            r["rss_ratio_reference_over_ours"] = round(ref["peak_rss_mb"] / r["peak_rss_mb"], 2)
        if name != "reference":
            r["agreement_with_reference"] = agreement(args.workdir, name)
        untiled = name.removesuffix("_tiled")
        if untiled != name and untiled in results:
            r[f"agreement_with_{untiled}"] = agreement(args.workdir, name, untiled)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "image_shape": shape, "autoencoder": autoencoder, "unet": unet, "steps": args.steps,
        "dpm_steps": args.dpm_steps, "seed": args.seed, "covariates": COVARIATES, "decode_split": args.decode_split,
        "tile": args.tile, "make_models_s": round(make_s, 1),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "native_bf16": cpu_has_bf16(), "torch": torch.__version__, "note": args.note},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


def table(report: dict) -> str:
    rows = [f"{'config':<16} {'status':<10} {'total s':>8} {'sample s':>9} {'decode s':>9} {'peak RSS MB':>12} "
            f"{'x faster':>9} {'RSS ratio':>10} {'max|diff|':>10} {'mean|diff|':>11}"]
    for name, r in report["results"].items():
        agree = r.get("agreement_with_reference") or {}
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        rows.append(f"{name:<16} {r['status'][:10]:<10} {fmt(r.get('total_s'), '8.1f')} {fmt(r.get('sampling_s'), '9.1f')}"
                    f" {fmt(r.get('decoding_s'), '9.1f')} {fmt(r.get('peak_rss_mb'), '12.0f')}"
                    f" {fmt(r.get('speedup_vs_reference'), '9.2f')} {fmt(r.get('rss_ratio_reference_over_ours'), '10.2f')}"
                    f" {fmt(agree.get('max_abs_diff'), '10.2e')} {fmt(agree.get('mean_abs_diff'), '11.2e')}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--workdir", type=Path, default=None, help="models and outputs (default: <out stem>_work)")
    p.add_argument("--quick", action="store_true", help="64^3 images, tiny networks: a smoke run")
    p.add_argument("--shape", type=int, nargs=3, default=None)
    p.add_argument("--autoencoder", default=None, help="autoencoder_spec('kl', preset)")
    p.add_argument("--unet", default=None, help="U-Net preset")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--dpm-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--decode-split", type=int, default=0, help="ours: exact slab decoding in N slabs (0: one pass)")
    p.add_argument("--tile", type=int, nargs=3, default=None,
                   help="latent tile of the *_tiled configurations (default [12, 16, 12]; quick: [4, 4, 4])")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--note", default="", help="machine conditions to record (e.g. other load)")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.out is None:
        p.error("--out is required")
    args.workdir = args.workdir or args.out.with_name(args.out.stem + "_work")
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
