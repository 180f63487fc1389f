"""Classifier-free guidance as a wrapper around a denoiser (Ho & Salimans 2022).

``ClassifierFreeGuidance(denoiser, scale, null_cond)`` is itself a denoiser: any sampler uses it unchanged.
It evaluates the conditional and unconditional predictions in ONE batched call and returns
``x0_uncond + scale * (x0_cond - x0_uncond)`` -- the same combination as on noise predictions, since ``x0_hat`` is
affine in ``eps_hat`` at fixed ``(x_t, t)``. ``scale = 1`` returns the conditional model exactly (one pass).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .tensor_utils import batch_timesteps

__all__ = ["null_conditioning", "ClassifierFreeGuidance"]


def null_conditioning(cond: Mapping[str, Any], null_cond: Mapping[str, torch.Tensor | None] | None) -> dict[str, Any]:
    """The unconditional counterpart of ``cond``, batch for batch.

    ``null_cond=None`` replaces every tensor by zeros. A mapping replaces only its keys (others, e.g. coordinate
    channels or a patch offset, stay as they are), each by its tensor (a learned null embedding, broadcast to the
    batch; shapes ``(...)`` or ``(1, ...)``) or by zeros when the value is ``None``. The same rule is used by
    :class:`~meddiff3d.diffusion.objectives.DiffusionObjective` for conditioning dropout.
    """
    out = dict(cond)
    keys = [k for k, v in cond.items() if torch.is_tensor(v)] if null_cond is None else list(null_cond)
    for k in keys:
        if k not in cond:
            continue
        v = cond[k]
        null = None if null_cond is None else null_cond[k]
        out[k] = torch.zeros_like(v) if null is None else torch.broadcast_to(null.to(v), v.shape)
    return out


def _per_sample(v: Any, x: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == x.shape[0]


class ClassifierFreeGuidance:
    """Guided denoiser: ``x0_u + scale (x0_c - x0_u)``, cond and uncond passes batched together.

    Args:
        denoiser: ``denoiser(x, t, **cond) -> x0_hat``.
        scale: guidance scale ``w`` (1 = conditional model, 0 = unconditional model).
        null_cond: the null condition, as in :func:`null_conditioning` (zeros for every key when ``None``).
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], scale: float,
                 null_cond: Mapping[str, torch.Tensor | None] | None = None) -> None:
        self.denoiser, self.scale, self.null_cond = denoiser, float(scale), null_cond

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.scale == 1.0:
            return self.denoiser(x, t, **cond)
        uncond = null_conditioning(cond, self.null_cond)
        # Per-sample tensors are doubled; anything else (e.g. one offset for the whole batch) is shared.
        both = {k: torch.cat([v, uncond[k]]) if _per_sample(v, x) else v for k, v in cond.items()}
        t = batch_timesteps(t, x)
        x0_cond, x0_uncond = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return x0_uncond + self.scale * (x0_cond - x0_uncond)

    def __getattr__(self, name: str) -> Any:  # e.g. ``.schedule`` of the wrapped adapter
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)
