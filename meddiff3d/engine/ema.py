"""Exponential moving average (EMA) of a network's weights, the weights used for validation, previews and inference.

After each optimiser step ``ema = d * ema + (1 - d) * weights`` for every floating-point parameter, with
``d = min(decay, (1 + n) / (10 + n))`` during warm-up (``n`` = number of updates so far), so early, poor weights are
forgotten quickly. Buffers (e.g. norm statistics) and integer tensors are copied, not averaged.

Why not ignite's ``EMAHandler`` or ``torch.optim.swa_utils.AveragedModel``: neither has this warm-up (ignite ramps the
momentum linearly, per engine iteration; ``AveragedModel`` copies the weights on its first update), so switching
would change the weights of every trained bundle. The trainer also skips the EMA update with the optimiser step on
non-finite gradients, and checkpoints keep the EMA as a plain ``state_dict`` of the bare network plus
``num_updates`` (``AveragedModel`` prefixes ``module.`` and adds ``n_averaged``), which is what makes resume exact and
``inference.pt`` weights-only.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch


class EMA:
    """An averaged copy of ``model``; ``ema.module`` is a ready-to-use ``nn.Module`` in eval mode.

    Args:
        model: the network being trained (unwrapped, not the ``DistributedDataParallel`` wrapper).
        decay: the final decay, e.g. 0.999 for short runs, 0.9999 for long ones. ``0`` makes the EMA a plain copy.
        warmup: use the ``(1 + n) / (10 + n)`` warm-up ramp capped at ``decay``.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Move the average towards ``model``'s current weights; call once after every optimiser step."""
        d = self.current_decay()
        averaged = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            target = averaged[name]
            if target.is_floating_point():
                target.lerp_(param.detach().to(target.dtype), 1.0 - d)
            else:
                target.copy_(param.detach())
        copies = dict(self.module.named_buffers())
        for name, buf in model.named_buffers():
            if name in copies:
                copies[name].copy_(buf.detach())
        self.num_updates += 1

    def state_dict(self) -> dict:
        """The averaged network's weights (a plain ``state_dict``, loadable into the bare network)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor], num_updates: int) -> None:
        self.module.load_state_dict(state)
        self.num_updates = int(num_updates)
