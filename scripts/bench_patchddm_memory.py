"""Benchmark: memory and time of PatchDDM training and inference, whole volume vs patches / sliding window.

    python scripts/bench_patchddm_memory.py --out bench_patchddm.json             # full size (hours on a CPU)
    python scripts/bench_patchddm_memory.py --out bench_patchddm.json --quick     # smoke run: small shapes, ~30 s
    ... [--regions 3] [--memory-limit-gb 20] [--configs train_p64 infer_sw64] [--threads 2] [--timeout 3600]

The network is the PatchDDM-like MONAI ``DiffusionModelUNet`` (3D, channels 32/64/128/128, 2 residual blocks per
level, no attention: 16.8 M parameters) whose input is the 4 MR sequences + the noisy mask (1 channel, or 3 region
channels WT/TC/ET with ``--regions 3``) + 3 coordinate channels: 8 (or 10) input channels, 1 (or 3) output channels.
Random weights and inputs (seeded): memory and time do not depend on the values.

Configurations, each in a fresh subprocess that reports its own peak RSS (``ru_maxrss``, which includes the ~0.4 GB
of the Python/torch/MONAI runtime; ``setup MB`` is the RSS after building network and optimiser, before the step):

* ``train_full``, ``train_p96``, ``train_p64``: one AdamW step (forward, epsilon MSE, backward, optimiser step,
  which allocates AdamW's two moment buffers) on a batch of one: the whole 4 x 160 x 192 x 160 volume, a 96^3 or a
  64^3 patch;
* ``infer_full``: one denoising forward pass (no gradients) on the whole volume, as PatchDDM samples;
* ``infer_sw96``, ``infer_sw64``: the same pass through MONAI's sliding-window inferer (96^3 / 64^3 windows, overlap
  0.25, Gaussian blending, one window at a time).

A child that runs out of memory reports "does not fit": either its allocation fails under the address-space limit
(``--memory-limit-gb``, ``RLIMIT_AS`` set in the child, default 80 % of the memory available when it starts, so a run
cannot take the machine down; ``--step-budget-mb`` caps it instead at what the child has mapped after setup plus a
budget, independent of how much the runtime maps) or the kernel's OOM killer ends it (SIGKILL). Over ``--timeout``
it reports "timeout".
``--quick`` shrinks everything (a 40 x 48 x 40 volume, 16^3 / 24^3 patches, channels 8/16/32/32) for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

CONFIGS = ("train_full", "train_p96", "train_p64", "infer_full", "infer_sw96", "infer_sw64")
FULL = {"shape": [160, 192, 160], "patches": {"96": 96, "64": 64}, "channels": [32, 64, 128, 128], "groups": 32}
QUICK = {"shape": [40, 48, 40], "patches": {"96": 24, "64": 16}, "channels": [8, 16, 32, 32], "groups": 8}
SEQUENCES, COORDINATES = 4, 3


def proc_status_mb(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MB (``VmRSS``: resident, ``VmSize``: mapped address space); NaN
    where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def limit_step_memory(budget_mb: float | None) -> None:
    """Cap the address space at what is mapped now plus ``budget_mb``: the step then fits or not in that working
    memory whatever the runtime itself maps (which differs between machines and library builds)."""
    if budget_mb:
        mapped = proc_status_mb("VmSize")
        if mapped != mapped:  # NaN: no /proc
            raise SystemExit("--step-budget-mb needs /proc/self/status (Linux)")
        limit = int((mapped + budget_mb) * 1024**2)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def available_gb() -> float:
    """MemAvailable from /proc/meminfo (Linux), else the physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


def network_args(preset: dict, regions: int) -> dict:
    return {"spatial_dims": 3, "in_channels": SEQUENCES + regions + COORDINATES, "out_channels": regions,
            "channels": list(preset["channels"]), "attention_levels": [False] * len(preset["channels"]),
            "num_res_blocks": 2, "norm_num_groups": preset["groups"]}


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return isinstance(err, MemoryError) or any(s in text for s in ("can't allocate memory", "not enough memory",
                                                                     "out of memory", "cannot allocate memory"))


# ------------------------------------------------------------------------------------------------ child
def input_shape(name: str, preset: dict) -> tuple[list[int], list[int] | None]:
    """``(spatial size of the network input, sliding-window size or None)`` of configuration ``name``."""
    if name.endswith("full"):
        return list(preset["shape"]), None
    size = preset["patches"][name[-2:]]
    return ([size] * 3, None) if name.startswith("train") else (list(preset["shape"]), [size] * 3)


def run_child(args: argparse.Namespace) -> dict:
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(args.seed)
    preset = QUICK if args.quick else FULL
    net = DiffusionModelUNet(**network_args(preset, args.regions))
    regions, name = args.regions, args.child
    train = name.startswith("train")
    spatial, roi = input_shape(name, preset)
    x = torch.randn(1, SEQUENCES + regions + COORDINATES, *spatial)
    t = torch.randint(0, 1000, (1,))
    result = {"parameters": sum(p.numel() for p in net.parameters())}
    if train:
        net.train()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        noise = torch.randn(1, regions, *spatial)
        result["setup_mb"] = proc_status_mb()
        limit_step_memory(args.step_budget_mb)
        start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(net(x, timesteps=t), noise)
        loss.backward()
        optimizer.step()
        result["seconds"] = time.perf_counter() - start
    else:
        net.eval()
        result["setup_mb"] = proc_status_mb()
        limit_step_memory(args.step_budget_mb)
        start = time.perf_counter()
        with torch.no_grad():
            if roi is None:
                net(x, timesteps=t)
            else:
                sliding_window_inference(x, roi_size=roi, sw_batch_size=1, overlap=0.25, mode="gaussian",
                                         predictor=lambda patch: net(patch, timesteps=t))
        result["seconds"] = time.perf_counter() - start
    return result


def child(args: argparse.Namespace) -> int:
    if args.memory_limit_gb:
        limit = int(args.memory_limit_gb * 1024**3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch

    from meddiff3d.pipelines.benchmark import peak_rss_mb  # before the step: no import under its memory budget

    if args.threads:
        torch.set_num_threads(args.threads)
    spatial, roi = input_shape(args.child, QUICK if args.quick else FULL)
    shapes = {"spatial": spatial, **({"roi": roi} if roi else {})}
    try:
        result = {"status": "ok", **shapes, **run_child(args)}
    except Exception as err:  # noqa: BLE001 -- torch reports failed allocations as RuntimeError
        if not is_out_of_memory(err):
            raise
        result = {"status": "does not fit", **shapes, "reason": f"{type(err).__name__}: {str(err)[:200]}"}
    result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
    print("RESULT " + json.dumps({**result, "peak_rss_mb": round(peak_rss_mb(), 1),
                                  "threads": torch.get_num_threads()}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ parent
def spawn(name: str, args: argparse.Namespace) -> dict:
    limit = args.memory_limit_gb or round(0.8 * available_gb(), 2)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--regions", str(args.regions),
           "--seed", str(args.seed), "--memory-limit-gb", str(limit)]
    if args.step_budget_mb:
        cmd += ["--step-budget-mb", str(args.step_budget_mb)]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    from meddiff3d.pipelines.benchmark import run_child as run_in_child

    result = run_in_child(cmd, timeout=args.timeout)
    limits = {"memory_limit_gb": limit, **({"step_budget_mb": args.step_budget_mb} if args.step_budget_mb else {})}
    if result["status"].startswith("failed") and is_out_of_memory(RuntimeError(result.get("stderr", ""))):
        # e.g. an import failing under the address-space limit
        return {"status": "does not fit", "reason": result["stderr"].strip().splitlines()[-1][:200],
                "wall_s": result["wall_s"], **limits}
    return {**result, **limits}


def add_ratios(results: dict) -> None:
    """RSS and time of each configuration relative to the smallest patch / window of the same kind."""
    for kind, reference in (("train", "train_p64"), ("infer", "infer_sw64")):
        ref = results.get(reference, {})
        for name, r in results.items():
            if name.startswith(kind) and r.get("status") == "ok" and ref.get("status") == "ok":
                r[f"rss_vs_{reference}"] = round(r["peak_rss_mb"] / ref["peak_rss_mb"], 2)
                r[f"time_vs_{reference}"] = round(r["seconds"] / max(ref["seconds"], 1e-9), 2)


def table(report: dict) -> str:
    def fmt(v, width, spec):
        return format(v, f"{width}{spec}") if isinstance(v, (int, float)) else f"{'-':>{width}}"

    rows = [f"{'config':<11} {'status':<13} {'input':<16} {'seconds':>8} {'setup MB':>9} {'step MB':>8} "
            f"{'peak RSS MB':>12} {'RSS ratio':>10} {'time ratio':>11}"]
    for name, r in report["results"].items():
        ratio = r.get("rss_vs_train_p64", r.get("rss_vs_infer_sw64"))
        tratio = r.get("time_vs_train_p64", r.get("time_vs_infer_sw64"))
        shape = "x".join(map(str, r.get("spatial", []))) or "-"
        if "roi" in r:
            shape += f" w{r['roi'][0]}"
        step = r["peak_rss_mb"] - r["setup_mb"] if "setup_mb" in r and "peak_rss_mb" in r else None
        rows.append(f"{name:<11} {r['status'][:13]:<13} {shape:<16} {fmt(r.get('seconds'), 8, '.2f')}"
                    f" {fmt(r.get('setup_mb'), 9, '.0f')} {fmt(step, 8, '.0f')} {fmt(r.get('peak_rss_mb'), 12, '.0f')}"
                    f" {fmt(ratio, 10, '.2f')} {fmt(tratio, 11, '.2f')}")
    rows.append("ratios: train_* relative to train_p64, infer_* relative to infer_sw64 (peak RSS, seconds); "
                "step MB = peak RSS - RSS after building network and optimiser")
    return "\n".join(rows)


def parent(args: argparse.Namespace) -> int:
    import torch

    preset = QUICK if args.quick else FULL
    results: dict[str, dict] = {}
    for name in args.configs:
        print(f"running {name} ...", flush=True)
        results[name] = spawn(name, args)
        print(f"  {json.dumps(results[name])}", flush=True)
    add_ratios(results)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
        "network": network_args(preset, args.regions), "volume": [SEQUENCES, *preset["shape"]],
        "patches": sorted(preset["patches"].values()), "regions": args.regions, "seed": args.seed,
        "machine": {"cores": os.cpu_count(), "torch_threads": args.threads or torch.get_num_threads(),
                    "torch": torch.__version__, "available_gb_at_start": round(available_gb(), 1),
                    "note": args.note},
        "results": results,
    }
    if args.out:
        from meddiff3d.utils.io import save_json

        save_json(report, args.out)
    print(table(report))
    return 0 if all(r.get("status") in ("ok", "does not fit") for r in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="JSON results file")
    p.add_argument("--quick", action="store_true", help="small shapes and network: a smoke run")
    p.add_argument("--regions", type=int, choices=(1, 3), default=1, help="mask channels: 1 (binary) or 3 (WT/TC/ET)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="address-space limit of each child (default: 80%% of the available memory)")
    p.add_argument("--step-budget-mb", type=float, default=None,
                   help="also cap each child's address space at what it has mapped after setup plus this many MB: "
                        "does the step fit in this working memory")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    p.add_argument("--note", default="", help="machine conditions to record (e.g. other load)")
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    return parent(args)


if __name__ == "__main__":
    raise SystemExit(main())
