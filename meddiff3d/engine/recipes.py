"""What every training recipe shares besides the trainer: its settings, checked once, and its ending.

A recipe (``pipelines/training.py``, ``seg_training.py``, ``autoencoder_training.py``, ``seg_baseline.py``) takes the
trainer's settings as keywords (``batch_size``, ``lr``, ``max_iterations``, ...; any keyword of
:class:`~meddiff3d.engine.trainer.DiffusionTrainer`), merged over its own defaults by :func:`trainer_settings`,
which refuses a mistyped one with the valid names; it ends with :func:`publish_inference` and
:func:`training_summary`.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meddiff3d.engine.trainer import DiffusionTrainer, TrainResult
from meddiff3d.errors import InputError
from meddiff3d.utils.io import atomic_path

logger = logging.getLogger("meddiff3d.engine")

__all__ = ["TRAINER_SETTINGS", "trainer_settings", "publish_inference", "training_summary"]

#: the settings a recipe passes through to the trainer (what a recipe builds itself is left out)
TRAINER_SETTINGS = tuple(name for name in inspect.signature(DiffusionTrainer.__init__).parameters
                         if name not in ("self", "network", "objective", "train_data", "run_dir", "meta"))


def trainer_settings(defaults: Mapping[str, Any], given: Mapping[str, Any], what: str = "training") -> dict[str, Any]:
    """``given`` trainer settings over the recipe's ``defaults``; an unknown name is an :class:`InputError` naming
    the closest valid one."""
    unknown = [k for k in given if k not in TRAINER_SETTINGS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], TRAINER_SETTINGS, n=1)
        raise InputError(f"{what}: unknown setting {unknown[0]!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; valid: {', '.join(TRAINER_SETTINGS)}")
    return {**defaults, **given}


def publish_inference(result: TrainResult, out: str | os.PathLike) -> Path:
    """On rank 0, copy the run's inference export (``RUN_DIR/inference.pt``) to ``out`` through a temporary file renamed
    into place (a killed copy never leaves a partial model file); other ranks write nothing. Returns ``out``."""
    out = Path(out)
    if result.rank == 0:
        with atomic_path(out) as tmp:
            shutil.copyfile(result.inference, tmp)
    return out


def training_summary(what: str, result: TrainResult, out: str | os.PathLike, start: float, **fields: Any) -> dict:
    """``{"out", "iteration", "last_loss", "resumed_from", **fields, "parameters", "seconds"}`` of a finished recipe
    (``start``: its ``time.perf_counter()`` at the beginning; ``fields`` may replace the defaults), logged as
    ``"<what>: <summary>"``."""
    summary = {"out": str(out), "iteration": result.iteration, "last_loss": result.last_loss,
               "resumed_from": result.resumed_from, **fields}
    summary.setdefault("parameters", sum(p.numel() for p in result.network.parameters()))
    summary.setdefault("seconds", round(time.perf_counter() - start, 2))
    logger.info("%s: %s", what, summary)
    return summary
