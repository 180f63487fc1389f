"""End-to-end runs of the training engine on tiny synthetic 3D data: overfitting, SIGKILL + resume, torchrun DDP."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from meddiff3d.engine import build_network, seed_everything, train
from meddiff3d.engine.selftest import EpsilonMSE, blob_volumes, tiny_unet_meta

REPO = Path(__file__).resolve().parents[1]
SELFTEST = [sys.executable, "-m", "meddiff3d.engine.selftest", "--quiet", "--threads", "1"]


def run_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def eps_mse_on_fixed_noise(network, data, objective, timesteps=(50, 200, 400, 600, 800, 950)) -> float:
    """The epsilon-prediction MSE on ``data`` at fixed timesteps and fixed noise (a deterministic evaluation)."""
    gen = torch.Generator().manual_seed(123)
    x0 = torch.stack([item["image"] for item in data])
    losses = []
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=gen)
            ab = objective.alpha_bar[t]
            pred = network(ab.sqrt() * x0 + (1 - ab).sqrt() * noise, timesteps=torch.full((len(x0),), t))
            losses.append((pred - noise).pow(2).mean().item())
    return sum(losses) / len(losses)


@pytest.mark.slow
def test_tiny_unet_overfits_four_volumes(tmp_path):
    """80 steps of batch 4 on four 16^3 blob volumes: EMA epsilon-MSE falls from ~1.0 to below 0.15 (about 0.05)."""
    torch.set_num_threads(1)
    meta = tiny_unet_meta()
    seed_everything(0)
    network = build_network(meta)
    data, objective = blob_volumes(4, 16, seed=0), EpsilonMSE()
    before = eps_mse_on_fixed_noise(network.eval(), data, objective)
    start = time.perf_counter()
    result = train(
        network, objective, data, run_dir=tmp_path, max_iterations=80, batch_size=4, lr=3e-3, ema_decay=0.95,
        grad_clip=1.0, checkpoint_every=1000, device="cpu", progress=False, seed=0, meta=meta,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    after = eps_mse_on_fixed_noise(result.ema.module, data, objective)
    assert before > 0.8
    assert after < 0.15, f"EMA epsilon-MSE {after:.4f} after 80 steps (was {before:.4f})"
    print(f"overfit: 80 steps in {elapsed:.1f} s, EMA eps-MSE {before:.3f} -> {after:.3f}")  # timing: reported only


def read_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_weights(tmp_path):
    """Bitwise: same CPU, same thread count, RNG and data position restored exactly (grad_accum 2 crosses epochs)."""
    args = ["--max-iterations", "24", "--checkpoint-every", "5", "--grad-accum", "2", "--seed", "7", "--write-digest"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen([*SELFTEST, "--run-dir", str(whole), *args], env=run_env(), cwd=REPO)
    victim = subprocess.Popen(
        [*SELFTEST, "--run-dir", str(killed), *args, "--throttle", "0.2"], env=run_env(), cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while read_iteration(last) < 10 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = read_iteration(last)
    assert 10 <= killed_at < 24, f"the run must be killed between checkpoints, last checkpoint at {killed_at}"

    subprocess.run([*SELFTEST, "--run-dir", str(killed), *args], env=run_env(), cwd=REPO, check=True, timeout=180)
    assert reference.wait(timeout=180) == 0
    assert (whole / "digest_rank0.txt").read_text() == (killed / "digest_rank0.txt").read_text()
    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["iteration"] == b["iteration"] == 24
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for idx, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], b["optimizer"]["state"][idx]["exp_avg_sq"])
    assert "resuming from" in (killed / "train.log").read_text()


#: the selftest, SIGKILLed right after writing last.pt at iteration argv[1], half-way through writing inference.pt
KILLED_BETWEEN_WRITES = """
import os, signal, sys
import torch
from meddiff3d.engine import selftest
real_save = torch.save
def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if ".inference.pt." in str(f) and obj["iteration"] == int(sys.argv[1]):
        os.truncate(f, os.path.getsize(f) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
sys.exit(selftest.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_kill_between_last_pt_and_inference_pt_is_repaired_on_restart(tmp_path):
    """The kill leaves last.pt at iteration 4, inference.pt at 2 and a half-written temporary file; the restart (nothing
    left to train) removes the temporary file and rewrites inference.pt from last.pt's EMA weights."""
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--max-iterations", "4", "--checkpoint-every", "2", "--num-volumes", "4",
            "--size", "8", "--quiet", "--threads", "1"]
    victim = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_WRITES, "4", *args], env=run_env(), cwd=REPO,
                            capture_output=True, timeout=300, check=False)
    assert victim.returncode == -signal.SIGKILL
    partial = list(run.glob(".inference.pt.*.tmp.pt"))
    assert len(partial) == 1 and read_iteration(run / "checkpoints" / "last.pt") == 4
    assert read_iteration(run / "inference.pt") == 2  # one checkpoint behind

    subprocess.run([*SELFTEST, *args[:-3]], env=run_env(), cwd=REPO, check=True, timeout=300, capture_output=True)
    assert not partial[0].exists() and not list(run.rglob("*.tmp*"))
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    export = torch.load(run / "inference.pt", weights_only=True)
    assert export["iteration"] == last["iteration"] == 4
    assert export["ema"].keys() == last["ema"].keys()
    assert all(torch.equal(export["ema"][k], v) for k, v in last["ema"].items())
    log = (run / "train.log").read_text()
    assert "removed 1 partial file(s) left by an interrupted run: .inference.pt." in log
    assert "inference.pt rewritten from" in log


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    run_dir = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), "-m", "meddiff3d.engine.selftest", "--quiet", "--run-dir", str(run_dir),
        "--max-iterations", "6", "--checkpoint-every", "3", "--num-volumes", "8", "--write-digest",
    ]  # fmt: skip
    subprocess.run(command, env=run_env(), cwd=REPO, check=True, timeout=240)
    digests = [(run_dir / f"digest_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert digests[0] == digests[1] and digests[0][1] == "6"
    data = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert data["train_config"]["world_size"] == 2 and len(data["rng"]["per_rank"]) == 2
    # the ranks drew different noise (per-rank seeds), so their RNG states differ
    assert not torch.equal(data["rng"]["per_rank"][0]["torch"], data["rng"]["per_rank"][1]["torch"])
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "checkpoints", "digest_rank0.txt", "digest_rank1.txt", "inference.pt", "meta.json", "tensorboard", "train.log"
    ]  # fmt: skip

    # extending the finished run resumes both ranks from the checkpoint (per-rank RNG states) and keeps them in step
    command[command.index("--max-iterations") + 1] = "8"
    command[command.index("--master_port") + 1] = str(free_port())
    subprocess.run(command, env=run_env(), cwd=REPO, check=True, timeout=240)
    digests = [(run_dir / f"digest_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert digests[0] == digests[1] and digests[0][1] == "8"
