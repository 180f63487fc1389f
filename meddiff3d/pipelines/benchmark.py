"""Time and memory of generation, with untrained models of any size (no data, no training needed).

    python -m meddiff3d.pipelines.benchmark --out runs/bench --shape 160 224 160 --spacing 1 1 1 \
        --autoencoder tiny --unet tiny_cpu --steps 50 [--amp none] [--decode-tile 12 16 12] [--decode-split 4]

prints one JSON line: seconds of model loading, sampling and decoding per sample, and the peak resident memory of the
process. :func:`untrained_pair` is also what the tests use to get a codec + diffusion model pair in a second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from meddiff3d.engine.checkpoint import INFERENCE_FORMAT, build_network, save_file
from meddiff3d.models.codec import LatentCodec, save_codec
from meddiff3d.models.loading import load_model
from meddiff3d.models.ldm import ANCHOR_SCHEDULE, BRAIN_COVARIATES, latent_diffusion_meta, latent_unet_spec
from meddiff3d.data.images import canonical_affine

__all__ = ["untrained_pair", "peak_rss_mb", "run_child", "count_flops", "conv3d_peak", "main"]


def untrained_pair(out_dir: str | os.PathLike, *, shape: Sequence[int] = (32, 48, 32),
                   spacing: Sequence[float] = (5.0, 5.0, 5.0), autoencoder: dict | None = None,
                   unet: str = "test", conditioning: str = "both", covariates: Sequence[str] = BRAIN_COVARIATES,
                   latent_scale: float = 1.0, seed: int = 0) -> tuple[Path, Path]:
    """Write ``codec.pt`` and ``diffusion.pt`` with random weights (seeded; the U-Net's zero-initialised layers
    perturbed, so its output depends on the noise level and the covariates) into ``out_dir``; returns their paths.

    ``autoencoder``: a ``{"class", "args"}`` spec (default: a 3-level AutoencoderKL [8, 16, 16], x4, 3 channels).
    """
    out = Path(out_dir)
    spec = autoencoder or {
        "class": "monai.networks.nets.AutoencoderKL",
        "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 16, 16], "latent_channels": 3,
                 "num_res_blocks": 1, "attention_levels": [False, False, False], "norm_num_groups": 8,
                 "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False},
    }
    torch.manual_seed(seed)
    codec = LatentCodec(build_network(spec), scale=latent_scale).eval()
    image = {"shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing],
             "affine": canonical_affine(shape, spacing).tolist(), "orientation": "RAS"}
    codec_path = save_codec(codec, out / "codec.pt", {"network": spec, "kind": "kl", "image": image})
    latent_shape = codec.latent_shape(shape)
    net_spec = latent_unet_spec(latent_shape[0], covariates, conditioning, unet)
    net = build_network(net_spec)
    with torch.no_grad():  # MONAI zero-initialises output layers: perturb them so outputs depend on the inputs
        for param in net.parameters():
            param.add_(0.05 * torch.randn_like(param))
    meta = latent_diffusion_meta(network=net_spec, schedule={"type": "NoiseSchedule", **ANCHOR_SCHEDULE},
                                 prediction="epsilon", covariates=covariates, conditioning=conditioning,
                                 latent_shape=latent_shape, image=image, codec=load_model(codec_path, "codec"),
                                 training={"note": "untrained (random weights)"})
    diffusion_path = save_file({"format": INFERENCE_FORMAT, "iteration": 0, "ema": net.state_dict(), "meta": meta},
                               out / "diffusion.pt")
    return codec_path, diffusion_path


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: on Linux the high-water mark of its own address space
    (``VmHWM``), since ``ru_maxrss`` survives ``exec`` and so starts a child of a large parent at the parent's size;
    elsewhere ``ru_maxrss`` (macOS reports bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of ``fn()`` as ``torch.utils.flop_counter`` counts them (convolutions and matrix
    products, 2 per multiply-add; elementwise work not counted). Build its modules and inputs on the ``meta`` device
    (``with torch.device("meta"): ...``) to count without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return int(counter.get_total_flops())


def conv3d_peak(dtype: torch.dtype, channels: Sequence[int] = (128, 64), shape: Sequence[int] = (16, 224, 160),
                repeats: int = 3) -> dict[str, float]:
    """Achieved GFLOP/s of a large 3x3x3 stride-1 ``conv3d`` (batch 1, ``C -> C`` channels, channels-last, padding 1,
    the best of ``repeats`` after a warm-up) for each channel count in ``channels``: the machine's convolution peak
    in ``dtype`` as PyTorch (oneDNN) reaches it, the yardstick for a network's achieved GFLOP/s."""
    import torch.nn.functional as F

    out = {}
    for c in channels:
        x = torch.randn(1, c, *shape).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        w = (0.01 * torch.randn(c, c, 3, 3, 3)).to(dtype).contiguous(memory_format=torch.channels_last_3d)
        best = float("inf")
        with torch.no_grad():
            F.conv3d(x, w, padding=1)
            for _ in range(repeats):
                start = time.perf_counter()
                F.conv3d(x, w, padding=1)
                best = min(best, time.perf_counter() - start)
        out[str(c)] = round(2 * c * c * 27 * x[0, 0].numel() / best / 1e9, 1)
    return out


def run_child(cmd: Sequence[str], timeout: float | None = None) -> dict:
    """Run one benchmark configuration in its own process and return its result.

    The child prints one line ``RESULT {json}``; the answer is that JSON with ``status: "ok"`` and ``wall_s``, or
    ``status`` ``"timeout"``, ``"does not fit"`` (killed by SIGKILL, i.e. the out-of-memory killer or an address-space
    limit) or ``"failed (exit N)"`` with the end of its stderr. Each configuration in a fresh process reports its own
    peak RSS, unaffected by what ran before.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"status": "timeout", "wall_s": round(time.perf_counter() - start, 1)}
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode == -signal.SIGKILL:
        return {"status": "does not fit", "reason": "killed (SIGKILL, out of memory)", "wall_s": wall}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"status": f"failed (exit {proc.returncode})", "stderr": stderr[-2000:], "wall_s": wall}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    from meddiff3d.models.autoencoder import autoencoder_spec
    from meddiff3d.pipelines.generation import generate

    p = argparse.ArgumentParser(prog="python -m meddiff3d.pipelines.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", type=int, nargs=3, default=[160, 224, 160])
    p.add_argument("--spacing", type=float, nargs=3, default=[1.0, 1.0, 1.0])
    p.add_argument("--autoencoder", default="tiny", help="autoencoder_spec('kl', preset)")
    p.add_argument("--unet", default="tiny_cpu")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--amp", default="auto")
    p.add_argument("--decode-tile", type=int, nargs=3, default=None)
    p.add_argument("--decode-split", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    codec_path, diffusion_path = untrained_pair(args.out / "models", shape=args.shape, spacing=args.spacing,
                                                autoencoder=autoencoder_spec("kl", args.autoencoder), unet=args.unet)
    made = time.perf_counter()
    paths = generate(codec_path, diffusion_path, covariates=dict.fromkeys(BRAIN_COVARIATES, 0.5),
                     num_samples=args.num_samples, sampler=args.sampler, steps=args.steps,
                     guidance_scale=args.guidance_scale, output_dir=args.out / "samples", amp=args.amp,
                     decode_tile=args.decode_tile, decode_split=args.decode_split, progress=False)
    total = time.perf_counter() - made
    sidecar = json.loads(paths[0].with_suffix("").with_suffix(".json").read_text())
    print(json.dumps({"shape": args.shape, "autoencoder": args.autoencoder, "unet": args.unet, "steps": args.steps,
                      "sampler": args.sampler, "amp": sidecar["amp"], "decode_tile": args.decode_tile,
                      "decode_split": args.decode_split, "threads": torch.get_num_threads(),
                      "make_models_s": round(made - start, 2), "generate_total_s": round(total, 2),
                      **{f"{k}_s_per_sample": v for k, v in sidecar["seconds"].items()},
                      "peak_rss_mb": round(peak_rss_mb(), 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
