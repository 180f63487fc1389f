"""Posterior sampling for linear inverse problems: a denoiser wrapper that makes every sampler draw from ``p(x | y)``
for a measurement ``y = A(x) + noise`` (undersampled k-space, a downsampled image, a masked image; operators in
:mod:`.measurements`).

The wrapper replaces the prior denoiser's ``x0_hat = E[x0 | x_t]`` by ``E[x0 | x_t, y]`` under the Gaussian
approximation ``x0 | x_t ~ N(x0_hat, r_t^2 I)`` (Pseudoinverse-guided diffusion, Song et al. 2023, with its
``r_t^2 = v b^2 / (a^2 v + b^2)`` for data of variance ``v``)::

    x0_hat <- x0_hat + r_t^2 A^T (sigma_y^2 I + r_t^2 A A^T)^+ (y - A x0_hat)

Without measurement noise (``noise_std = 0``) this is the projection of ``x0_hat`` onto ``{x : A x = y}`` of
DDNM (Wang et al. 2023) and of the k-space data-consistency step of score-based MRI reconstruction (Chung & Ye
2022): the sampled k-space lines are replaced by the measured ones. By Tweedie's formula the corrected estimate is
the posterior's denoiser, so deterministic and stochastic samplers alike sample the posterior (a sampler whose last
step is not the denoiser's estimate, UniPC's corrector, ends close to but not exactly on ``A x = y``); for data that is
Gaussian with variance ``v`` per voxel the correction is exact (tests/test_data_consistency.py checks the samples'
mean and variance against the closed form). The correction costs one ``A``, one ``A^T``: no network gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import torch

from meddiff3d.errors import InputError

from .schedules import Schedule
from .tensor_utils import batch_timesteps

__all__ = ["DataConsistency", "Measurement"]


class Measurement(Protocol):
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def adjoint(self, y: torch.Tensor) -> torch.Tensor: ...

    def back_project(self, r: torch.Tensor, noise_var: Any, prior_var: Any) -> torch.Tensor: ...


class DataConsistency:
    """``DataConsistency(denoiser, operator, y, schedule)`` is a denoiser of the posterior ``p(x | y)``.

    Args:
        denoiser: the prior denoiser ``denoiser(x_t, t, **cond) -> x0_hat`` (guidance and other wrappers inside).
        operator: the measurement operator (``forward``, ``adjoint``, ``back_project``).
        y: the measurement, as ``operator.forward`` returns it for the batch being sampled (or for one sample: a
            leading batch dimension of 1 broadcasts).
        schedule: the schedule ``denoiser`` uses (for ``r_t``).
        noise_std: standard deviation of the measurement noise (of the real and of the imaginary part of complex
            measurements; 0: the measurement is kept exactly).
        prior_variance: the data's variance per voxel ``v`` (images scaled to [0, 1]: about 0.1; unit-variance
            data: 1). Only the balance between measurement and prior depends on it: none when ``noise_std = 0``.
    """

    def __init__(self, denoiser: Callable[..., torch.Tensor], operator: Measurement, y: torch.Tensor,
                 schedule: Schedule, *, noise_std: float = 0.0, prior_variance: float = 1.0) -> None:
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise InputError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        if not (math.isfinite(prior_variance) and prior_variance > 0):
            raise InputError(f"prior_variance must be a finite number > 0, got {prior_variance!r}")
        self.denoiser, self.operator, self.y, self.schedule = denoiser, operator, y, schedule
        self.noise_var, self.prior_variance = float(noise_std) ** 2, float(prior_variance)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        x0 = self.denoiser(x, t, **cond)
        a, b = self.schedule.scaling(batch_timesteps(t, x).to(x.device), x.ndim)
        v = self.prior_variance
        estimate = x0.float() if x0.dtype in (torch.float16, torch.bfloat16) else x0  # the correction in full precision
        r2 = (v * b**2 / (a**2 * v + b**2)).to(estimate.dtype)
        measured = self.operator.forward(estimate)
        if measured.shape[1:] != self.y.shape[1:] or self.y.shape[0] not in (1, measured.shape[0]):
            raise InputError(f"measurement of shape {list(self.y.shape)} does not match the operator's output for "
                             f"the batch, {list(measured.shape)}")
        residual = self.y.to(measured) - measured
        corrected = estimate + r2 * self.operator.back_project(residual, self.noise_var, r2)
        return corrected.to(x0.dtype)

    def __getattr__(self, name: str) -> Any:  # e.g. ``.schedule`` of a wrapped adapter, as the other wrappers
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)
