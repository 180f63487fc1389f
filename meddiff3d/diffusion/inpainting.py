"""Inpainting: generate the unknown region of a volume consistently with a known region.

Two tools, both leaving the known region exactly equal to the input at the end:

* :class:`Inpainting` -- a denoiser wrapper (the "replacement" method): before each call the known region of
  ``x_t`` is replaced by the known image noised to ``t`` (with one fixed noise draw), and the known region of the
  returned ``x0_hat`` is the known image. Works with every sampler.
* :func:`sample_repaint` -- RePaint (Lugmayr et al. 2022): ancestral steps where the known region is re-noised from
  the known image at every step, and each step is repeated ``resample`` times by jumping back one step with fresh
  forward noise so the generated region harmonises with the known one.

``mask`` is 1 where the image is known and 0 where it is generated; it broadcasts against ``(B, C, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from meddiff3d.errors import InputError

from .samplers import Callback, Timesteps, _coefs, ddpm_step, renoise, step_pairs
from .schedules import Schedule
from .tensor_utils import as_generator, batch_timesteps, randn

__all__ = ["Inpainting", "sample_repaint"]


def _check(known: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if known.shape != x.shape:
        raise InputError(f"known image of shape {tuple(known.shape)} does not match x of shape {tuple(x.shape)}")
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise InputError(f"mask of shape {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}") from None
    return mask.to(x.dtype)


class Inpainting:
    """Replacement-method inpainting wrapper: ``Inpainting(denoiser, known, mask, schedule)`` is a denoiser."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], known: torch.Tensor, mask: torch.Tensor,
                 schedule: Schedule, generator: torch.Generator | int | None = None) -> None:
        self.denoiser, self.known, self.schedule = denoiser, known, schedule
        self.mask = _check(known, mask, known)
        self.noise = randn(known.shape, as_generator(generator, known.device), known)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        a, b = self.schedule.scaling(batch_timesteps(t, x), x.ndim)
        known_t = (a * self.known + b * self.noise).to(x.dtype)
        x = self.mask * known_t + (1 - self.mask) * x
        return self.mask * self.known + (1 - self.mask) * self.denoiser(x, t, **cond)


@torch.no_grad()
def sample_repaint(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule,
                   known: torch.Tensor, mask: torch.Tensor, *, resample: int = 1,
                   generator: torch.Generator | int | None = None, callback: Callback | None = None,
                   cond: Mapping[str, Any] | None = None) -> torch.Tensor:
    """RePaint sampling; ``resample`` evaluations per step (1 = plain ancestral replacement, RePaint uses 10).

    Jumps are one step long (RePaint's ``jump_length = 1``). Returns a volume whose known region equals ``known``.
    """
    if resample < 1:
        raise InputError(f"resample must be >= 1, got {resample}")
    generator = as_generator(generator, x.device)
    mask = _check(known, mask, x)
    cond = dict(cond or {})
    for i, (t, t_next) in enumerate(step_pairs(timesteps)):
        t_coefs, next_coefs = _coefs(schedule, t, x), _coefs(schedule, t_next, x)
        for r in range(resample):
            x0 = denoiser(x, batch_timesteps(t, x), **cond)
            if callback is not None and r == 0:
                callback(i, t, x, x0)
            unknown_next = ddpm_step(x, x0, t_coefs, next_coefs, generator)
            a_s, b_s = next_coefs
            known_next = (a_s * known + b_s * randn(x.shape, generator, x)).to(x.dtype)
            x_next = mask * known_next + (1 - mask) * unknown_next
            if r < resample - 1 and t_next is not None:
                x = renoise(x_next, next_coefs, t_coefs, generator)
        x = x_next
    return x
