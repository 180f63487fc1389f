"""Train a tiny 3D denoiser on synthetic blob volumes: the engine end to end, in seconds, on a CPU.

    python -m meddiff3d.engine.selftest --run-dir runs/selftest --max-iterations 50 --seed 0
    python -m torch.distributed.run --nproc_per_node 2 -m meddiff3d.engine.selftest --run-dir runs/ddp ...

Used by the kill/resume and torchrun tests. The objective here is a minimal epsilon-prediction DDPM loss (the real ones
live in ``meddiff3d.diffusion``); it draws timesteps and noise from the global torch RNG, like the real ones.
Re-running the same command on a finished run directory does nothing; on an interrupted one it resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.engine.trainer import DiffusionTrainer, seed_everything


def blob_volumes(n: int, size: int = 16, seed: int = 0) -> list[dict]:
    """``n`` volumes ``(1, size, size, size)`` in [-1, 1]: one to three Gaussian blobs each on a dark background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=0).astype(np.float32)
    items = []
    for _ in range(n):
        vol = np.zeros((size,) * 3, dtype=np.float32)
        for _ in range(rng.integers(1, 4)):
            centre = rng.uniform(0.25 * size, 0.75 * size, size=3).reshape(3, 1, 1, 1)
            radius = rng.uniform(0.08 * size, 0.2 * size)
            vol += np.exp(-((grid - centre) ** 2).sum(0) / (2 * radius**2))
        vol = np.clip(vol, 0, 1) * 2 - 1
        items.append({"image": torch.from_numpy(vol[None].copy())})
    return items


class EpsilonMSE:
    """Per-sample MSE of a DDPM epsilon prediction (linear betas); randomness from the global torch RNG."""

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> None:
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - betas, 0).float()
        self.num_steps = num_steps

    def __call__(self, network: torch.nn.Module, batch: dict) -> torch.Tensor:
        x0 = batch["image"]
        t = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        ab = self.alpha_bar.to(x0.device)[t].view(-1, *([1] * (x0.ndim - 1)))
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        pred = network(xt, timesteps=t)
        return (pred.float() - noise).pow(2).flatten(1).mean(1)


def tiny_unet_meta(channels: tuple[int, ...] = (8, 16)) -> dict:
    """Meta for a ~0.1 M-parameter 3D ``DiffusionModelUNet``."""
    args = {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": list(channels),
        "attention_levels": [False] * len(channels), "num_res_blocks": 1, "norm_num_groups": 8,
    }  # fmt: skip
    return {
        "network": {"class": "monai.networks.nets.DiffusionModelUNet", "args": args},
        "schedule": {"kind": "ddpm_linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
        "prediction": "epsilon",
        "normalisation": {"kind": "fixed", "range": [-1.0, 1.0]},
    }


def weights_digest(network: torch.nn.Module) -> str:
    """SHA-256 of every tensor in ``network.state_dict()`` (names and bytes), for comparing runs and ranks."""
    h = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def preview_denoised(network: torch.nn.Module) -> torch.Tensor:
    """A one-step denoising preview at t=500 from fixed noise (its own generator: no effect on training RNG)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 16, 16, 16, generator=gen).to(next(network.parameters()).device)
    return network(x, timesteps=torch.full((1,), 500, device=x.device))[0, 0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m meddiff3d.engine.selftest", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--max-iterations", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-volumes", type=int, default=6)
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--amp", default="none")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--keep-last", type=int, default=0)
    p.add_argument("--preview-every", type=int, default=0, help="0: no previews")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (bitwise resume needs the same number)")
    p.add_argument("--throttle", type=float, default=0.0, help="sleep seconds per iteration (kill tests)")
    p.add_argument("--write-digest", action="store_true", help="write RUN_DIR/digest_rank{R}.txt (every rank)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    meta = tiny_unet_meta()
    seed_everything(args.seed)  # identical initial weights on every rank and every restart
    network = build_network(meta)
    trainer = DiffusionTrainer(
        network,
        EpsilonMSE(),
        blob_volumes(args.num_volumes, args.size, seed=args.seed),
        run_dir=args.run_dir,
        max_iterations=args.max_iterations,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        amp=args.amp,
        grad_accum=args.grad_accum,
        grad_clip=1.0,
        checkpoint_every=args.checkpoint_every,
        keep_last=args.keep_last,
        seed=args.seed,
        meta=meta,
        device=args.device,
        preview_fn=preview_denoised if args.preview_every else None,
        preview_every=args.preview_every or None,
        log_every=5,
        progress=not args.quiet,
    )
    if args.throttle > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: time.sleep(args.throttle))
    result = trainer.run()
    if args.write_digest:
        rank = trainer.dist.rank
        digest = weights_digest(result.network)
        (args.run_dir / f"digest_rank{rank}.txt").write_text(f"{digest} {result.iteration}\n")
    loss = result.last_loss
    print(f"selftest: iteration {result.iteration} loss {loss if loss is not None else math.nan:.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
