"""The diffusion trainer: an ignite ``Engine`` whose iteration is one optimiser step of ``objective(network, batch)``.

One iteration = ``grad_accum`` micro-batches (forward + backward each, gradients summed with weight ``1/grad_accum``),
then unscale (fp16), gradient clipping, the optimiser step, and the EMA update. ``max_iterations``,
``checkpoint_every``, ``log_every`` and the learning-rate schedule all count these optimiser steps.

Resume: when ``RUN_DIR/checkpoints/last.pt`` exists, :meth:`DiffusionTrainer.run` restores the network, EMA,
optimiser, grad scaler, iteration counter and every rank's RNG states, and the data stream continues at the next
micro-batch (see :mod:`meddiff3d.engine.data`). A run killed at any point and restarted therefore reproduces the
uninterrupted run bit for bit on the same hardware, world size and thread count, as long as the objective and the
data transforms draw from the global torch RNG (as :class:`meddiff3d.data.patches.RandPatchd` does; with
``num_workers=0`` transforms run in the main process; a MONAI ``Randomizable`` 's own state is not restored) and the
network is deterministic (CUDA kernels may not be unless ``deterministic=True``). On start, the temporary files of
writes a kill interrupted are deleted, and an ``inference.pt`` lagging ``last.pt`` (a kill between the two writes) is
rewritten from ``last.pt`` 's EMA weights: ``last.pt`` wins.

Every training recipe ends with :func:`publish_inference` (rank 0 copies ``inference.pt`` to ``out``, atomically) and
:func:`training_summary` (the summary dict, logged).

Being an ignite ``Engine``, the trainer accepts MONAI / ignite handlers (``handlers=[...]`` or ``.attach(trainer)``);
``engine.state.output`` is ``{"loss", "lr", "grad_norm", "skipped"}``: give MONAI's ``StatsHandler`` /
``TensorBoardStatsHandler`` ``output_transform=lambda out: out["loss"]`` (in a bundle config
``"$lambda out: out['loss']"``); their default ``lambda x: x[0]`` expects MONAI's decollated list output.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events

from meddiff3d.engine import checkpoint as ckpt
from meddiff3d.engine.data import BatchStream, StepBatches
from meddiff3d.engine.distributed import DistContext, derived_seed, setup_distributed
from meddiff3d.engine.ema import EMA
from meddiff3d.engine.monitoring import PreviewFn, TrainingMonitor, ValidateFn
from meddiff3d.engine.precision import resolve_device, resolve_precision
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_json

logger = logging.getLogger("meddiff3d.engine")

Objective = Callable[[torch.nn.Module, dict], torch.Tensor]  # (network, batch) -> per-sample loss (B,)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed torch (CPU and CUDA), numpy and python ``random`` from ``(seed, rank)``."""
    value = derived_seed(seed, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors of a (nested) batch onto ``device``; MONAI ``MetaTensor`` s become plain tensors (cheaper ops)."""
    if torch.is_tensor(batch):
        tensor = batch.as_tensor() if hasattr(batch, "as_tensor") else batch
        return tensor.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


@dataclass
class TrainResult:
    """What a finished :meth:`DiffusionTrainer.run` returns."""

    run_dir: Path
    iteration: int
    resumed_from: int | None  # the checkpoint iteration this run started from, None for a fresh run
    last_loss: float | None  # this rank's loss at the final iteration (None if nothing was left to train)
    checkpoint: Path  # RUN_DIR/checkpoints/last.pt
    inference: Path  # RUN_DIR/inference.pt (EMA weights + meta)
    network: torch.nn.Module  # the trained (bare) network
    ema: EMA
    rank: int = 0  # this process's rank (0 without torchrun): only rank 0 publishes


class DiffusionTrainer(Engine):
    """Train ``network`` on ``objective`` with EMA, AMP, accumulation, clipping, checkpoints, resume and DDP.

    Args:
        network: the bare network (moved to ``device``; wrapped in ``DistributedDataParallel`` under torchrun).
        objective: ``objective(network, batch) -> per-sample loss (B,)``, e.g. a
            ``meddiff3d.diffusion.objectives.DiffusionObjective``.
        train_data: a map-style dataset / list of dicts, or a ``DataLoader`` (see :class:`BatchStream`).
        run_dir: where checkpoints, logs, TensorBoard events and previews go; a checkpoint found there is resumed.
        max_iterations: optimiser steps in total (a resumed run stops at the same number).
        batch_size: micro-batch size per rank (ignored for a ``DataLoader``: its own batch size is used).
        optimizer: ``None`` (AdamW with ``lr`` and ``weight_decay``), an optimiser or a factory ``params -> optimiser``
            (e.g. ``{"_target_": "torch.optim.Adam", "_partial_": true, "lr": 1e-4}`` in a bundle config).
        lr_warmup: linear learning-rate warm-up over this many steps; ``lr_schedule(step) -> factor`` replaces it.
        ema_decay, ema_warmup: see :class:`EMA`.
        amp: ``"none"``, ``"bf16"``, ``"fp16"``, ``"auto"`` (see :mod:`meddiff3d.engine.precision`).
        grad_accum: micro-batches per optimiser step.
        grad_clip: maximum global gradient norm (``None``: no clipping). Steps with non-finite gradients are skipped.
        checkpoint_every: write ``last.pt`` and ``inference.pt`` every N steps (and at the end).
        keep_last: also keep the last K checkpoints as ``iter_NNNNNNNN.pt`` (hard links, no extra space).
        seed: seeds the RNGs of a fresh run (per rank) and the data order. Seed the network's initialisation
            yourself (e.g. :func:`seed_everything`) before building it.
        meta: JSON-able description saved with the weights (architecture, schedule, normalisation, ...).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        preview_fn, preview_every: ``preview_fn(ema_network) -> 3D volume``, logged every N steps and at the end.
        validate_fn, validate_every: ``validate_fn(ema_network) -> {name: float}``, logged as ``val/<name>``.
        handlers: extra MONAI / ignite handlers with an ``attach(engine)`` method.
        deterministic: ask torch for deterministic kernels (needed for bitwise-reproducible CUDA runs).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        objective: Objective,
        train_data: Iterable,
        *,
        run_dir: str | Path,
        max_iterations: int,
        batch_size: int = 1,
        optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        lr_warmup: int = 0,
        lr_schedule: Callable[[int], float] | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        amp: str | bool = "none",
        grad_accum: int = 1,
        grad_clip: float | None = None,
        checkpoint_every: int = 1000,
        keep_last: int = 0,
        seed: int = 0,
        meta: Mapping | None = None,
        device: str | torch.device = "auto",
        shuffle: bool = True,
        num_workers: int = 0,
        preview_fn: PreviewFn | None = None,
        preview_every: int | None = None,
        validate_fn: ValidateFn | None = None,
        validate_every: int | None = None,
        log_every: int = 10,
        progress: bool = True,
        handlers: Sequence[Any] = (),
        deterministic: bool = False,
        ddp_kwargs: Mapping | None = None,
    ) -> None:
        super().__init__(self._train_step)
        self.logger.setLevel(logging.WARNING)  # ignite's per-epoch lines; progress is logged by TrainingMonitor
        if max_iterations < 1 or grad_accum < 1 or checkpoint_every < 1:
            raise ValueError("max_iterations, grad_accum and checkpoint_every must be positive integers")
        self.run_dir = Path(run_dir)
        self.max_iterations, self.grad_accum = int(max_iterations), int(grad_accum)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.checkpoint_every, self.keep_last, self.seed = int(checkpoint_every), int(keep_last), int(seed)
        self.meta = ckpt.jsonable(dict(meta or {}))
        self.objective = objective
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False

        self.device = resolve_device(device)
        self.dist: DistContext = setup_distributed(self.device.type)
        self.precision = resolve_precision(amp, self.device)
        self.grad_scaler = self.precision.make_grad_scaler()

        self.network = network.to(self.device)
        if isinstance(objective, torch.nn.Module):  # schedules kept as buffers follow the network's device
            objective.to(self.device)
        self.ema = EMA(self.network, decay=ema_decay, warmup=ema_warmup)
        self.model = self.network  # what the objective calls: the DDP wrapper under torchrun
        if self.dist.is_distributed:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.network, device_ids, **dict(ddp_kwargs or {}))
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        elif optimizer is not None:
            self.optimizer = optimizer(self.network.parameters())
        else:
            self.optimizer = torch.optim.AdamW(self.network.parameters(), lr=lr, weight_decay=weight_decay)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.lr_warmup, self.lr_schedule = int(lr_warmup), lr_schedule

        stream = BatchStream(train_data, batch_size, seed=self.seed, rank=self.dist.rank,
                             world_size=self.dist.world_size, shuffle=shuffle, num_workers=num_workers,
                             pin_memory=self.device.type == "cuda")
        self.data = StepBatches(stream, self.grad_accum, position=lambda: self.state.iteration)
        self.train_config = {  # saved in checkpoints; a resume with different values is logged as a warning
            "batch_size": stream.batch_size, "grad_accum": self.grad_accum, "world_size": self.dist.world_size,
            "seed": self.seed, "shuffle": bool(shuffle), "ema_decay": float(ema_decay), "ema_warmup": bool(ema_warmup),
            "amp": self.precision.name, "grad_clip": self.grad_clip, "lr_warmup": self.lr_warmup,
            "lr": [g["initial_lr"] for g in self.optimizer.param_groups], "optimizer": type(self.optimizer).__name__,
            "max_iterations": self.max_iterations,
        }  # fmt: skip

        self.monitor = TrainingMonitor(self, log_every=log_every, progress=progress, preview_fn=preview_fn,
                                       preview_every=preview_every, validate_fn=validate_fn,
                                       validate_every=validate_every)
        self.monitor.attach(self)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._maybe_checkpoint)
        self.add_event_handler(Events.COMPLETED, self._final_checkpoint)
        for handler in handlers:
            handler.attach(self)

    # ---------------------------------------------------------------------------------------------- one step
    def learning_rate_factor(self, step: int) -> float:
        """The multiplier of the initial learning rate at optimiser step ``step`` (0-based): a pure function."""
        if self.lr_schedule is not None:
            return float(self.lr_schedule(step))
        return min(1.0, (step + 1) / self.lr_warmup) if self.lr_warmup > 0 else 1.0

    def _train_step(self, engine: Engine, micro_batches: list) -> dict:
        return self.train_step(micro_batches, step=engine.state.iteration - 1)

    def train_step(self, micro_batches: Sequence[Any], step: int = 0) -> dict:
        """One optimiser step over ``micro_batches`` (gradients averaged over them); ``step`` sets the learning rate.

        Returns ``{"loss": mean loss, "lr", "grad_norm": before clipping, "skipped": non-finite gradients}``.
        """
        factor = self.learning_rate_factor(step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.device, non_blocking=True)
            last = i == len(micro_batches) - 1
            no_sync = self.model.no_sync() if self.dist.is_distributed and not last else contextlib.nullcontext()
            with no_sync:
                with self.precision.autocast():
                    per_sample = self.objective(self.model, batch)
                loss = per_sample.float().mean() / len(micro_batches)
                (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()
            total += loss.detach()
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.network.parameters(), max_norm))
        skipped = not math.isfinite(grad_norm)
        if self.grad_scaler is not None:
            scale = self.grad_scaler.get_scale()
            self.grad_scaler.step(self.optimizer)  # skips the step itself on inf/nan
            self.grad_scaler.update()
            skipped = skipped or self.grad_scaler.get_scale() < scale
        elif not skipped:
            self.optimizer.step()
        if skipped:
            logger.warning("step %d: non-finite gradients, optimiser step skipped", step + 1)
        else:
            self.ema.update(self.network)
        lr = self.optimizer.param_groups[0]["lr"]
        return {"loss": float(total), "lr": lr, "grad_norm": grad_norm, "skipped": skipped}

    # ---------------------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.pt"

    @property
    def inference_export(self) -> Path:
        return self.run_dir / "inference.pt"

    def checkpoint_payload(self) -> dict:
        """The full training state (see :mod:`meddiff3d.engine.checkpoint`). A collective under DDP (RNG gather)."""
        rng = self.dist.gather_objects(ckpt.capture_rng_state())
        return {
            "format": ckpt.CHECKPOINT_FORMAT,
            "iteration": int(self.state.iteration),
            "epoch": int(self.state.epoch),
            "model": self.network.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_num_updates": self.ema.num_updates,
            "optimizer": self.optimizer.state_dict(),
            "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler is not None else {},
            "rng": {"world_size": self.dist.world_size, "per_rank": rng},
            "train_config": self.train_config,
            "meta": self.meta,
        }

    def save_checkpoint(self) -> None:
        payload = self.checkpoint_payload()  # every rank takes part in the RNG gather
        if not self.dist.is_main:
            return
        it = payload["iteration"]
        ckpt.save_file(payload, self.last_checkpoint)
        ckpt.export_inference(payload, self.inference_export)
        if self.keep_last > 0:
            kept = self.checkpoint_dir / f"iter_{it:08d}.pt"
            kept.unlink(missing_ok=True)
            try:
                kept.hardlink_to(self.last_checkpoint)
            except OSError:  # file systems without hard links
                shutil.copyfile(self.last_checkpoint, kept)
            for old in sorted(self.checkpoint_dir.glob("iter_*.pt"))[: -self.keep_last]:
                old.unlink()
        logger.info("checkpoint at iteration %d -> %s", it, self.last_checkpoint)

    def _maybe_checkpoint(self, engine: Engine) -> None:
        if engine.state.iteration % self.checkpoint_every == 0:
            self.save_checkpoint()

    def _final_checkpoint(self, engine: Engine) -> None:
        if engine.state.iteration % self.checkpoint_every != 0:
            self.save_checkpoint()

    def restore(self, path: str | Path) -> int:
        """Restore the full training state from a checkpoint; returns its iteration."""
        data = ckpt.read_checkpoint(path, map_location="cpu")  # RNG states must stay on the CPU; weights are copied
        ckpt.load_weights(data, self.network, "model", source=f"checkpoint {path}")
        ckpt.load_weights(data, self.ema.module, "ema", source=f"checkpoint {path}")
        self.ema.num_updates = int(data["ema_num_updates"])
        saved_optimizer = data["train_config"].get("optimizer", type(self.optimizer).__name__)
        try:
            if saved_optimizer != type(self.optimizer).__name__:
                raise ValueError(f"it was saved by {saved_optimizer}")
            self.optimizer.load_state_dict(data["optimizer"])
        except (KeyError, ValueError) as err:
            raise InputError(f"checkpoint {path}: its optimiser state does not fit {type(self.optimizer).__name__} "
                             f"({err}); resume with the run's optimiser or start a new run_dir") from None
        if self.grad_scaler is not None and data["grad_scaler"]:
            self.grad_scaler.load_state_dict(data["grad_scaler"])
        saved = data["train_config"]
        changed = {k: (v, self.train_config.get(k)) for k, v in saved.items() if self.train_config.get(k) != v}
        changed.pop("max_iterations", None)
        if changed:
            logger.warning("resuming %s with changed settings (saved, now): %s; the run will not match an "
                           "uninterrupted one", path, changed)  # fmt: skip
        iteration = int(data["iteration"])
        rng = data["rng"]
        if rng["world_size"] == self.dist.world_size:
            ckpt.restore_rng_state(rng["per_rank"][self.dist.rank])
        else:
            logger.warning("checkpoint %s was written by %d rank(s), this run has %d: RNG states re-seeded",
                           path, rng["world_size"], self.dist.world_size)  # fmt: skip
            seed_everything(derived_seed(self.seed, iteration), self.dist.rank)
        latest = self.dist.is_main and Path(path) == self.last_checkpoint
        if latest and ckpt.sync_inference(data, self.inference_export):  # a kill between last.pt and inference.pt
            logger.info("%s rewritten from %s (iteration %d): it lagged behind after an interrupted run",
                        self.inference_export, path, iteration)
        return iteration

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:  # type: ignore[override]
        """Train to ``max_iterations``, resuming from ``RUN_DIR/checkpoints/last.pt`` if it exists."""
        resumed_from, start, last_loss = None, 0, None
        try:
            self.monitor.open_log_file()
            removed = ckpt.remove_partial_files(self.run_dir, "checkpoints", "previews") if self.dist.is_main else []
            if removed:
                logger.info("removed %d partial file(s) left by an interrupted run: %s", len(removed),
                            ", ".join(str(p.relative_to(self.run_dir)) for p in removed))
            if self.last_checkpoint.exists():
                resumed_from = self.restore(self.last_checkpoint)
                logger.info("resuming from %s at iteration %d", self.last_checkpoint, resumed_from)
            else:
                seed_everything(self.seed, self.dist.rank)
            self.dist.barrier()
            if self.dist.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                save_json({"meta": self.meta, "train_config": self.train_config}, self.run_dir / "meta.json")
            epoch_length = self.data.steps_per_epoch() or self.max_iterations
            start = resumed_from or 0
            if start < self.max_iterations:
                state = {"iteration": start, "max_iters": self.max_iterations, "epoch_length": epoch_length}
                self.load_state_dict(state)
                super().run(self.data)
                last_loss = self.state.output["loss"] if self.state.output else None
            self.dist.barrier()
        finally:
            self.monitor.close()
            # the DDP wrapper goes before its process group: destroyed after it (at interpreter exit), its reducer
            # can abort the process ("terminate called without an active exception", seen once in CI)
            self.model = self.network
            gc.collect()
            self.dist.shutdown()
        return TrainResult(run_dir=self.run_dir, iteration=max(start, self.state.iteration), resumed_from=resumed_from,
                           last_loss=last_loss, checkpoint=self.last_checkpoint, inference=self.inference_export,
                           network=self.network, ema=self.ema, rank=self.dist.rank)


def train(network: torch.nn.Module, objective: Objective, train_data: Iterable, **kwargs: Any) -> TrainResult:
    """``DiffusionTrainer(network, objective, train_data, **kwargs).run()``: the one-call entry point."""
    return DiffusionTrainer(network, objective, train_data, **kwargs).run()
