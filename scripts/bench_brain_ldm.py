"""Benchmark: the MONAI model-zoo brain LDM inference loop vs meddiff3d ``generate`` on the same weights.

    python scripts/bench_brain_ldm.py --out bench.json            # full size: 160x224x160, anchor architectures
    python scripts/bench_brain_ldm.py --out bench.json --quick    # smoke run: 64^3 images, tiny networks

One pair of random-weight (seeded) model files of the anchor architecture is written once (``untrained_pair`` with the
``anchor`` autoencoder and U-Net presets; the U-Net's zero-initialised output layers are perturbed so its output is
non-trivial). Each configuration then generates one volume in a fresh subprocess that reports its own peak RSS
(``VmHWM``: :func:`meddiff3d.pipelines.benchmark.peak_rss_mb`; ``ru_maxrss`` would include this parent's size); a
child killed by the OOM killer reports "does not fit", one over ``--timeout`` "timeout":

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
* ``ours_fast``: the bundle's default sampling (``--fast SAMPLER:STEPS``, default ``unipc:8``: the demo model's own,
  the fastest configuration of equal quality in the model card's quality-versus-steps table), the sampler's default
  spacing.
* ``ours_student``: DDIM at ``--student-steps`` (default 4) on the "trailing" grid: the sampling of a progressively
  distilled student (``configs/train_distillation.yaml``) of the anchor U-Net's size (a student has its teacher's
  architecture, so random weights time it exactly).

``ours_*`` decode whole volumes with the codec's default, the exact streamed decode
(:mod:`meddiff3d.models.streamed_decode`); ``--decode-split 1`` asks for the plain one-pass decode instead.

Decoding alone, one fixed latent (``N(0, 1)``, the seed's generator), whole volume unless said otherwise:
``decode_fp32`` / ``decode_bf16`` (one pass), ``decode_split`` (bf16, ``--decode-split`` slabs, default 4),
``decode_tiled`` (bf16, ``--tile``), ``decode_streamed`` / ``decode_streamed_fp32`` (the streamed decode); each is
compared with ``decode_fp32`` and ``decode_bf16`` (max / mean |diff|).

Before the configurations, a child measures the machine's conv3d peak (``conv3d_peak`` in the report): a large 3x3x3
convolution at the decoder's channel counts (128, 64) in bf16 and fp32 (:func:`meddiff3d.pipelines.benchmark.
conv3d_peak`; ``--no-peak`` skips it). Every configuration then reports achieved GFLOP/s of the U-Net step (U-Net
FLOPs x steps / sampling seconds) and of the decode (the MONAI decoder's FLOPs / decoding seconds; the streamed decode
executes fewer, ``decode_gflops_executed``), and their share of that peak in their dtype. FLOPs are counted by
``torch.utils.flop_counter`` on the ``meta`` device (convolutions and matrix products).

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

CONFIGS = ("reference", "ours_ddim", "ours_ddim_tiled", "ours_dpmpp", "ours_dpmpp_tiled", "ours_fp32", "ours_fast",
           "ours_student")
DECODE_CONFIGS = ("decode_fp32", "decode_bf16", "decode_split", "decode_tiled", "decode_streamed",
                  "decode_streamed_fp32")
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
            "total_s": total, "amp": sidecar["amp"], "timestep_spacing": sidecar["timestep_spacing"],
            "sampler": sidecar["sampler"], "steps": sidecar["steps"],
            "denoiser_evaluations": sidecar["denoiser_evaluations"]}


def run_decode(models: Path, mode: str, seed: int, out: Path, *, split: int | None,
               tile: list[int] | None) -> dict:
    """Decode one fixed latent with the codec file, as ``mode`` says (see the module doc)."""
    import torch

    from meddiff3d.models.loading import load_model

    t0 = time.perf_counter()
    amp = None if mode.endswith("fp32") else torch.bfloat16
    options = {"amp_dtype": amp, "channels_last": amp is not None,
               "stream": mode.startswith("decode_streamed")}
    if mode == "decode_split":
        options["split"] = split or 4
    if mode == "decode_tiled":
        options["decode_tile"] = tile
    loaded = load_model(models / "codec.pt", "codec", **options)
    codec = loaded.network
    shape = codec.latent_shape(loaded.meta["image"]["shape"])
    z = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    t1 = time.perf_counter()
    volume = codec.decode(z)
    t2 = time.perf_counter()
    np.save(out, volume[0, 0].float().numpy())
    return {"load_s": t1 - t0, "decoding_s": t2 - t1, "total_s": t2 - t0,
            "decode_mode": "streamed" if codec.streams(z.shape) else
            "tiled" if mode == "decode_tiled" else "split" if mode == "decode_split" else "one-pass"}


def run_conv_peak(quick: bool) -> dict:
    import torch

    from meddiff3d.engine.precision import cpu_has_bf16
    from meddiff3d.pipelines.benchmark import conv3d_peak

    t0 = time.perf_counter()
    shape = (4, 64, 64) if quick else (16, 224, 160)
    peak = {"fp32": conv3d_peak(torch.float32, shape=shape)}
    if cpu_has_bf16():
        peak["bf16"] = conv3d_peak(torch.bfloat16, shape=shape)
    return {"conv3d_gflops": peak, "total_s": time.perf_counter() - t0}


def ours_sampling(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """``(sampler, steps, spacing)`` of an ``ours_*`` configuration."""
    if args.child == "ours_fast":
        sampler, _, steps = args.fast.partition(":")
        return sampler, int(steps), None
    if args.child == "ours_student":
        return "ddim", args.student_steps, "trailing"
    if args.child.startswith("ours_dpmpp"):
        return "dpmpp_2m", args.dpm_steps, None
    return "ddim", args.steps, "monai"


def child(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    models, out = args.workdir / "models", args.workdir / f"{args.child}.npy"
    if args.child == "conv_peak":
        result = run_conv_peak(args.quick)
    elif args.child in DECODE_CONFIGS:
        result = run_decode(models, args.child, args.seed, out, split=args.decode_split or None, tile=args.tile)
    elif args.child == "reference":
        result = run_reference(models, args.steps, args.seed, out)
    else:
        sampler, steps, spacing = ours_sampling(args)
        result = run_ours(models, steps, args.seed, out, sampler=sampler,
                          amp="none" if args.child == "ours_fp32" else "auto", spacing=spacing,
                          decode_split=args.decode_split or None,
                          decode_tile=args.tile if args.child.endswith("_tiled") else None)
    from meddiff3d.pipelines.benchmark import peak_rss_mb

    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    if args.child == "reference":
        result["decode_mode"] = "one-pass"
    elif args.child.startswith("ours_"):
        from meddiff3d.models.codec import STREAM_MIN_VOXELS

        split = args.decode_split or 0
        image = torch.load(models / "codec.pt", map_location="cpu", weights_only=True)["meta"]["image"]["shape"]
        result["decode_mode"] = ("tiled" if args.child.endswith("_tiled") else "split" if split > 1 else
                                 "one-pass" if split == 1 or np.prod(image) < STREAM_MIN_VOXELS else "streamed")
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
           "--steps", str(args.steps), "--dpm-steps", str(args.dpm_steps), "--seed", str(args.seed),
           "--fast", args.fast, "--student-steps", str(args.student_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.quick:
        cmd += ["--quick"]
    if args.decode_split:
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
    peak = {}
    if not args.no_peak:
        print("measuring the conv3d peak ...", flush=True)
        peak = spawn("conv_peak", args)
        print(f"  {json.dumps(peak)}", flush=True)
    results: dict[str, dict] = {}
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        results[name] = spawn(name, args)
        print(f"  {json.dumps(results[name])}", flush=True)
        args.out.write_text(json.dumps({"partial": True, "results": results}, indent=2))
    flops = flop_counts(args.workdir / "models")
    efficiency(results, peak.get("conv3d_gflops") or {}, flops, args, cpu_has_bf16())
    ref = results.get("reference", {})
    for name, r in results.items():
        if name.startswith("ours_") and r.get("status") == "ok" and ref.get("status") == "ok":
            r["speedup_vs_reference"] = round(ref["total_s"] / r["total_s"], 2)
            r["sampling_speedup_vs_reference"] = round(ref["sampling_s"] / max(r["sampling_s"], 1e-9), 2)
            r["rss_ratio_reference_over_ours"] = round(ref["peak_rss_mb"] / r["peak_rss_mb"], 2)
        if name.startswith("ours_"):
            r["agreement_with_reference"] = agreement(args.workdir, name)
        untiled = name.removesuffix("_tiled")
        if untiled != name and untiled in results:
            r[f"agreement_with_{untiled}"] = agreement(args.workdir, name, untiled)
        if name in DECODE_CONFIGS:
            for against in ("decode_fp32", "decode_bf16"):
                if against != name and against in results:
                    r[f"agreement_with_{against}"] = agreement(args.workdir, name, against)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "image_shape": shape, "autoencoder": autoencoder, "unet": unet, "steps": args.steps,
        "dpm_steps": args.dpm_steps, "fast": args.fast, "student_steps": args.student_steps, "seed": args.seed, "covariates": COVARIATES, "decode_split": args.decode_split,
        "tile": args.tile, "make_models_s": round(make_s, 1), "gflop": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "native_bf16": cpu_has_bf16(), "torch": torch.__version__, "note": args.note},
        "conv3d_peak": peak, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


def flop_counts(models: Path) -> dict[str, int]:
    """FLOPs of one U-Net step, of the MONAI decoder's one-pass decode, and of what the streamed decode executes: the
    same but 8 of 27 taps in each nearest-upsampling convolution (:class:`~meddiff3d.models.slab_convs.NearestUpConv`).
    Counted on the ``meta`` device: nothing is computed."""
    import torch
    from monai.networks.blocks import UpSample

    from meddiff3d.engine.checkpoint import build_network
    from meddiff3d.pipelines.benchmark import count_flops

    def meta(name: str) -> dict:
        return torch.load(models / name, map_location="cpu", weights_only=True, mmap=True)["meta"]

    codec, diffusion = meta("codec.pt"), meta("diffusion.pt")
    args = diffusion["network"]["args"]
    with torch.device("meta"):
        autoencoder, unet = build_network(codec["network"]).eval(), build_network(diffusion["network"]).eval()
        latent = torch.zeros(1, *diffusion["latent"]["shape"])
        x = torch.zeros(1, args["in_channels"], *latent.shape[2:])
        context = torch.zeros(1, 1, args["cross_attention_dim"]) if args.get("with_conditioning") else None
        t = torch.zeros(1, dtype=torch.long)
        upsampling = []  # FLOPs of the convolutions after nearest upsampling
        hooks = [m.postconv.conv.register_forward_hook(
            lambda mod, inp, out: upsampling.append(2 * out.numel() * mod.in_channels * 27))
            for m in autoencoder.decoder.modules() if isinstance(m, UpSample) and hasattr(m, "postconv")]
        counts = {"unet_step": count_flops(lambda: unet(x, timesteps=t, context=context)),
                  "decode": count_flops(lambda: autoencoder.decode_stage_2_outputs(latent))}
        for hook in hooks:
            hook.remove()
    counts["decode_streamed"] = counts["decode"] - sum(upsampling) * 19 // 27
    return counts


def efficiency(results: dict[str, dict], peaks: dict[str, dict], flops: dict[str, int], args: argparse.Namespace,
               bf16: bool) -> None:
    """Achieved GFLOP/s of the U-Net step and of the decode per configuration, and their share of the conv3d peak
    (``peaks``: GFLOP/s by dtype and channel count) in the configuration's dtype."""
    for name, r in results.items():
        if r.get("status") != "ok":
            continue
        dtype = "fp32" if name in ("reference", "ours_fp32") or name.endswith("fp32") or not bf16 else "bf16"
        peak = max(peaks[dtype].values()) if dtype in peaks else None
        r["dtype"] = dtype
        if r.get("sampling_s"):
            steps = r.get("denoiser_evaluations", args.steps)
            r["unet_gflops"] = round(flops["unet_step"] * steps / r["sampling_s"] / 1e9, 1)
        mode = r.get("decode_mode")
        if r.get("decoding_s") and mode in ("one-pass", "split", "streamed"):
            r["decode_gflops"] = round(flops["decode"] / r["decoding_s"] / 1e9, 1)
            executed = flops["decode_streamed"] if mode == "streamed" else flops["decode"]
            r["decode_gflops_executed"] = round(executed / r["decoding_s"] / 1e9, 1)
        if peak:
            for key in ("unet_gflops", "decode_gflops", "decode_gflops_executed"):
                if key in r:
                    r[key.replace("gflops", "pct_of_peak")] = round(100 * r[key] / peak, 1)


def table(report: dict) -> str:
    rows = [f"{'config':<21} {'status':<10} {'total s':>8} {'sample s':>9} {'decode s':>9} {'peak RSS MB':>12} "
            f"{'x faster':>9} {'max|diff|':>10} {'mean|diff|':>11} {'UNet GF/s':>10} {'%pk':>5} {'dec GF/s':>9} "
            f"{'exec':>6} {'%pk':>5}"]
    for name, r in report["results"].items():
        against = "decode_fp32" if name in DECODE_CONFIGS else "reference"
        agree = r.get(f"agreement_with_{against}") or {}
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        rows.append(f"{name:<21} {r['status'][:10]:<10} {fmt(r.get('total_s'), '8.1f')}"
                    f" {fmt(r.get('sampling_s'), '9.1f')} {fmt(r.get('decoding_s'), '9.1f')}"
                    f" {fmt(r.get('peak_rss_mb'), '12.0f')} {fmt(r.get('speedup_vs_reference'), '9.2f')}"
                    f" {fmt(agree.get('max_abs_diff'), '10.2e')} {fmt(agree.get('mean_abs_diff'), '11.2e')}"
                    f" {fmt(r.get('unet_gflops'), '10.0f')} {fmt(r.get('unet_pct_of_peak'), '5.0f')}"
                    f" {fmt(r.get('decode_gflops'), '9.0f')} {fmt(r.get('decode_gflops_executed'), '6.0f')}"
                    f" {fmt(r.get('decode_pct_of_peak_executed', r.get('decode_pct_of_peak')), '5.0f')}")
    peaks = (report.get("conv3d_peak") or {}).get("conv3d_gflops")
    if peaks:
        rows.append("conv3d peak GFLOP/s (3x3x3, C -> C, by C): " + "; ".join(
            f"{dtype} " + ", ".join(f"{c}: {v:.0f}" for c, v in by_c.items()) for dtype, by_c in peaks.items()))
    rows.append("max/mean |diff| against the reference (decode_*: against decode_fp32); dec GF/s: the MONAI "
                "decoder's FLOPs per second, exec: executed FLOPs per second, %pk: executed vs the conv3d peak")
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
    p.add_argument("--fast", default="unipc:8", metavar="SAMPLER:STEPS", help="ours_fast's sampling")
    p.add_argument("--student-steps", type=int, default=4, help="ours_student's DDIM steps (trailing grid)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + DECODE_CONFIGS)
    p.add_argument("--decode-split", type=int, default=0,
                   help="ours: decode in N slabs (split execution); 1: one pass; 0: the default (streamed)")
    p.add_argument("--tile", type=int, nargs=3, default=None,
                   help="latent tile of the *_tiled configurations (default [12, 16, 12]; quick: [4, 4, 4])")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--note", default="", help="machine conditions to record (e.g. other load)")
    p.add_argument("--no-peak", action="store_true", help="skip the conv3d peak measurement")
    p.add_argument("--child", choices=CONFIGS + DECODE_CONFIGS + ("conv_peak",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if args.out is None:
        p.error("--out is required")
    args.workdir = args.workdir or args.out.with_name(args.out.stem + "_work")
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
