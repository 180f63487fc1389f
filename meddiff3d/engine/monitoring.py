"""What a training run reports while it runs: TensorBoard scalars, a log file, a progress bar, previews, validation.

Everything is an ignite event handler attached to the trainer. Scalars are averaged over ranks (a collective, so the
handlers run on every rank) but only rank 0 writes. Preview and validation callbacks receive the EMA network in eval
mode and run with the RNG states saved and restored around them, so they never change the training trajectory.

Why not MONAI's ``TensorBoardStatsHandler`` / ``TensorBoardImageHandler`` or ignite's ``ProgressBar``: the loss is
averaged over ``log_every`` steps and over ranks (a collective every rank must join, which handlers running on rank 0
only cannot do), the writer's ``purge_step`` drops what a killed run logged after its last checkpoint, previews come
from calling the EMA network (not from ``engine.state`` tensors), and ignite's bar restarts every data epoch
(``epoch_length`` = steps per epoch) while this one counts the whole run from the resumed iteration.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from ignite.engine import Engine, Events

from meddiff3d.engine.checkpoint import capture_rng_state, restore_rng_state

logger = logging.getLogger("meddiff3d.engine")

PreviewFn = Callable[[torch.nn.Module], Any]  # EMA network -> a volume (D, H, W) or (C, D, H, W), an image (H, W)
ValidateFn = Callable[[torch.nn.Module], dict]  # EMA network -> {"name": float}


def centre_slices(volume: Any) -> list[np.ndarray]:
    """The three orthogonal centre slices of a 3D volume (channel 0 of a 4D one), each scaled to [0, 1]; a 2D image
    ``(H, W)`` is its own one view."""
    vol = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume, dtype=np.float32)
    while vol.ndim > 3:
        vol = vol[0]
    if vol.ndim not in (2, 3):
        raise ValueError(f"a preview must be a 2D image or a 3D volume, got shape {vol.shape}")
    lo, hi = float(np.nanmin(vol)), float(np.nanmax(vol))
    vol = np.clip((vol - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    if vol.ndim == 2:
        return [vol]
    cx, cy, cz = (s // 2 for s in vol.shape)
    return [vol[:, :, cz].T[::-1].copy(), vol[:, cy, :].T[::-1].copy(), vol[cx, :, :].T[::-1].copy()]


class TrainingMonitor:
    """Scalars to TensorBoard (``RUN_DIR/tensorboard``), lines to the ``meddiff3d.engine`` logger and
    ``RUN_DIR/train.log``, a tqdm bar; plus the optional preview (PNG + TensorBoard images) and validation hooks."""

    def __init__(
        self,
        trainer: Any,
        *,
        log_every: int = 10,
        progress: bool = True,
        preview_fn: PreviewFn | None = None,
        preview_every: int | None = None,
        validate_fn: ValidateFn | None = None,
        validate_every: int | None = None,
    ) -> None:
        self.trainer = trainer
        self.log_every = max(1, int(log_every))
        self.progress = progress
        self.preview_fn, self.preview_every = preview_fn, preview_every
        self.validate_fn, self.validate_every = validate_fn, validate_every
        self.writer = None
        self.bar = None
        self.file_handler: logging.Handler | None = None
        self._last_time: float | None = None
        self._loss_sum, self._count = 0.0, 0

    @property
    def is_main(self) -> bool:
        return self.trainer.dist.is_main

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    # ------------------------------------------------------------------------------------------------ events
    def _started(self, engine: Engine) -> None:
        self._last_time = time.perf_counter()
        if not self.is_main:
            return
        self.open_log_file()
        run_dir = Path(self.trainer.run_dir)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a killed run logged after its last checkpoint, so curves do not double back.
        start = engine.state.iteration
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        if self.progress:
            from tqdm.auto import tqdm

            # a run bounded by a wall-clock budget passes a huge max_iterations: show a count, not a hopeless ETA
            total = self.trainer.max_iterations if self.trainer.max_iterations < 10**8 else None
            self.bar = tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)

    def open_log_file(self) -> None:
        """Copy the ``meddiff3d`` loggers' INFO lines to ``RUN_DIR/train.log`` (rank 0; appends across resumes)."""
        if not self.is_main or self.file_handler is not None:
            return
        run_dir = Path(self.trainer.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file_handler = logging.FileHandler(run_dir / "train.log")
        self.file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.file_handler.setLevel(logging.INFO)
        root = logging.getLogger("meddiff3d")
        root.addHandler(self.file_handler)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)

    def _iteration_completed(self, engine: Engine) -> None:
        it, out = engine.state.iteration, engine.state.output
        now = time.perf_counter()
        iter_time, self._last_time = now - (self._last_time or now), now
        self._loss_sum += out["loss"]
        self._count += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
        if it % self.log_every == 0 or it == self.trainer.max_iterations:
            loss = self.trainer.dist.mean(self._loss_sum / self._count, self.trainer.device)
            self._loss_sum, self._count = 0.0, 0
            if self.is_main:
                scalars = {"loss": loss, "lr": out["lr"], "grad_norm": out["grad_norm"], "iteration_time": iter_time}
                for name, value in scalars.items():
                    self.writer.add_scalar(f"train/{name}", value, it)
                logger.info(
                    "iteration %d/%d loss %.5f lr %.3g grad_norm %.3g %.3f s/it%s",
                    it, self.trainer.max_iterations, loss, out["lr"], out["grad_norm"], iter_time,
                    " (step skipped: non-finite gradients)" if out["skipped"] else "",
                )  # fmt: skip
        if self.validate_fn is not None and self.validate_every and it % self.validate_every == 0:
            self.validate(it)
        if self.preview_fn is not None and self.preview_every and it % self.preview_every == 0:
            self.preview(it)

    def _completed(self, engine: Engine) -> None:
        it = engine.state.iteration
        if self.validate_fn is not None and not (self.validate_every and it % self.validate_every == 0):
            self.validate(it)
        if self.preview_fn is not None and not (self.preview_every and it % self.preview_every == 0):
            self.preview(it)

    # ------------------------------------------------------------------------------------------------ hooks
    def _call_with_ema(self, fn: Callable) -> Any:
        ema_net = self.trainer.ema.module
        rng = capture_rng_state()
        try:
            with torch.no_grad():
                return fn(ema_net.eval())
        finally:
            restore_rng_state(rng)

    def preview(self, iteration: int) -> None:
        """Call the preview hook on the EMA network; log its centre slices to TensorBoard and ``RUN_DIR/previews``."""
        if not self.is_main:
            return
        from meddiff3d.utils.io import save_image_png, save_preview_png

        volume = self._call_with_ema(self.preview_fn)
        views = centre_slices(volume)
        for axis, image in zip(("axial", "coronal", "sagittal") if len(views) == 3 else ("image",), views):
            self.writer.add_image(f"preview/{axis}", image, iteration, dataformats="HW")
        vol = volume.detach().float().cpu().numpy() if torch.is_tensor(volume) else np.asarray(volume)
        while vol.ndim > 3:
            vol = vol[0]
        png = Path(self.trainer.run_dir) / "previews" / f"iter_{iteration:08d}.png"
        if vol.ndim == 3:
            save_preview_png(vol, png)
        else:
            save_image_png(views[0], png)

    def validate(self, iteration: int) -> None:
        """Call the validation hook on the EMA network and log the scalars it returns as ``val/<name>``."""
        if not self.is_main:
            return
        results = self._call_with_ema(self.validate_fn) or {}
        for name, value in results.items():
            self.writer.add_scalar(f"val/{name}", float(value), iteration)
        logger.info("validation at iteration %d: %s", iteration, {k: round(float(v), 6) for k, v in results.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.file_handler is not None:
            logging.getLogger("meddiff3d").removeHandler(self.file_handler)
            self.file_handler.close()
            self.file_handler = None
