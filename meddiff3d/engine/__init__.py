"""Training engine: an ignite/MONAI-compatible trainer for diffusion objectives, with EMA, AMP, gradient
accumulation and clipping, atomic weights-only checkpoints, exact resume, TensorBoard and torchrun data parallelism.

Entry points: :func:`train` / :class:`DiffusionTrainer` to train, :func:`load_checkpoint` / :func:`build_network`
to use the result (the one loader of model files is :func:`meddiff3d.models.loading.load_model`); :class:`WallClockBudget` stops training after a time budget.
``python -m meddiff3d.engine.selftest`` trains a tiny model end to end.
"""

from meddiff3d.engine.budget import WallClockBudget
from meddiff3d.engine.checkpoint import build_network, export_inference, load_checkpoint
from meddiff3d.engine.ema import EMA
from meddiff3d.engine.trainer import DiffusionTrainer, TrainResult, seed_everything, train

__all__ = [
    "EMA",
    "DiffusionTrainer",
    "TrainResult",
    "WallClockBudget",
    "build_network",
    "export_inference",
    "load_checkpoint",
    "seed_everything",
    "train",
]
