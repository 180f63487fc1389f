"""Image -> noise and back: deterministic DDIM inversion, partial noising and SDEdit.

* :func:`noise_to` -- ``x_t = a_t x0 + b_t noise`` (the forward process at one timestep; MONAI's ``add_noise``).
* :func:`ddim_invert` -- runs the deterministic DDIM ODE backwards (clean -> ``timesteps[0]``), approximating the
  noise at the unknown point by the denoiser's estimate at the current one. :func:`sample_ddim` with the same
  ``timesteps`` maps the result back; the round-trip error shrinks with the number of steps.
* :func:`sdedit` -- noise an image part-way and sample back (Meng et al. 2022): editing, harmonisation, and the
  "partial diffusion" of anomaly-detection methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .samplers import Callback, Timesteps, _coefs, get_sampler, step_pairs
from .schedules import Schedule
from .tensor_utils import as_generator, batch_timesteps, randn

__all__ = ["noise_to", "ddim_invert", "sdedit"]


def noise_to(x0: torch.Tensor, t: torch.Tensor | float, schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """``x0`` noised to timestep ``t`` (scalar or ``(B,)``) with the given ``noise``."""
    return schedule.add_noise(x0, noise, batch_timesteps(t, x0))


@torch.no_grad()
def ddim_invert(denoiser: Callable[..., torch.Tensor], x0: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                fixed_point_iterations: int = 0, callback: Callback | None = None,
                cond: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The noise ``x_T`` (at ``timesteps[0]``) that deterministic DDIM with ``timesteps`` maps to ``x0``.

    ``timesteps`` are given in sampling order (descending), exactly as for :func:`sample_ddim`. Each sampling step
    ``t -> s`` is inverted as ``x_t = a_t (x_s - b_s eps) / a_s + b_t eps`` with ``eps`` the noise estimated at
    ``(x_s, t)`` -- the classic first-order inversion, whose round-trip error falls like 1/steps.
    ``fixed_point_iterations = k`` re-estimates ``eps`` at the current ``x_t`` guess k more times per step, converging
    to the exact inverse of the DDIM step (round trip to solver precision) at the cost of ``k`` extra evaluations.
    """
    cond = dict(cond or {})
    x = x0
    pairs = list(step_pairs(timesteps))
    for i, (t, s) in enumerate(reversed(pairs)):
        (a_t, b_t), (a_s, b_s) = _coefs(schedule, t, x), _coefs(schedule, s, x)
        x_t = x
        for _ in range(1 + int(fixed_point_iterations)):
            x0_hat = denoiser(x_t, batch_timesteps(t, x), **cond)
            eps = (x_t - a_t * x0_hat) / b_t
            x_t = (a_t * (x - b_s * eps) / a_s + b_t * eps).to(x0.dtype)
        if callback is not None:
            callback(i, t, x_t, x0_hat)
        x = x_t
    return x


@torch.no_grad()
def sdedit(denoiser: Callable[..., torch.Tensor], x0: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
           sampler: str | Callable[..., torch.Tensor] = "ddim", generator: torch.Generator | int | None = None,
           callback: Callback | None = None, cond: Mapping[str, Any] | None = None,
           **sampler_kwargs: Any) -> torch.Tensor:
    """Noise ``x0`` to ``timesteps[0]`` and denoise it back over ``timesteps`` with ``sampler``.

    Pick the strength by truncating a sequence, e.g. ``schedule.timesteps(50)[25:]`` starts half-way.
    """
    generator = as_generator(generator, x0.device)
    sample = get_sampler(sampler) if isinstance(sampler, str) else sampler
    ts = torch.as_tensor(timesteps)
    x_t = noise_to(x0, ts[0], schedule, randn(x0.shape, generator, x0))
    return sample(denoiser, x_t, ts, schedule, generator=generator, callback=callback, cond=cond, **sampler_kwargs)
