"""The one denoiser interface, and adapters from networks trained under each prediction convention.

A *denoiser* is any callable ``denoiser(x_t, t, **cond) -> x0_hat``: ``x_t`` is a noisy batch ``(B, C, *spatial)``
(2D or 3D), ``t`` a float tensor of timesteps of shape ``(B,)`` (or a scalar), ``cond`` named conditioning passed on
to the network as keyword arguments (e.g. ``context=`` for cross-attention). Samplers only ever see this interface.

A *network* is called as ``net(x_t, timesteps=t, **cond)`` -- MONAI's ``DiffusionModelUNet`` plugs in unchanged.
What it predicts depends on how it was trained; one adapter per convention turns it into a denoiser, reading like
the table of coefficients (``x_t = a x0 + b noise``, ``(a, b) = schedule.scaling(t)``):

=================  ===========================  ===============================
adapter            network predicts             x0_hat
=================  ===========================  ===============================
EpsilonDenoiser    noise                         (x_t - b eps) / a
VDenoiser          v = a noise - b x0            (a x_t - b v) / (a^2 + b^2)
X0Denoiser         x0                            x0
FlowDenoiser       u = x0 - noise (MONAI RFlow)  (x_t + b u) / (a + b)
=================  ===========================  ===============================

Each adapter also gives ``.eps(x_t, t, **cond)``, the implied noise ``(x_t - a x0_hat) / b``.
:class:`GaussianDenoiser` is the exact denoiser of a Gaussian data distribution, :class:`GaussianMixtureDenoiser` that
of a mixture of isotropic Gaussians (a multi-modal toy whose flow map is not affine), for tests and sanity checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from meddiff3d.errors import InputError

from .schedules import Schedule
from .tensor_utils import batch_timesteps

__all__ = [
    "Denoiser",
    "EpsilonDenoiser",
    "VDenoiser",
    "X0Denoiser",
    "FlowDenoiser",
    "GaussianDenoiser",
    "GaussianMixtureDenoiser",
    "PREDICTION_TYPES",
    "make_denoiser",
    "eps_from_x0",
]

Denoiser = Callable[..., torch.Tensor]


def eps_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """The noise implied by a denoised estimate: ``(x_t - a x0_hat) / b``."""
    a, b = schedule.scaling(batch_timesteps(t, x_t), x_t.ndim)
    return ((x_t - a * x0_hat) / b).to(x_t.dtype)


class _NetworkDenoiser:
    """Shared plumbing: call the network with ``timesteps=`` and the conditioning keywords."""

    def __init__(self, net: Callable[..., torch.Tensor], schedule: Schedule) -> None:
        self.net = net
        self.schedule = schedule

    def _predict(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]):
        t = batch_timesteps(t, x)
        a, b = self.schedule.scaling(t, x.ndim)
        return self.net(x, timesteps=t, **cond), a, b

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return eps_from_x0(x, self(x, t, **cond), t, self.schedule)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.net).__name__}, {self.schedule!r})"


class EpsilonDenoiser(_NetworkDenoiser):
    """A network trained to predict the added noise (DDPM / MONAI ``prediction_type="epsilon"``)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        eps, a, b = self._predict(x, t, cond)
        return ((x - b * eps) / a).to(x.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._predict(x, t, cond)[0]


class VDenoiser(_NetworkDenoiser):
    """A network trained to predict ``v = a noise - b x0`` (MONAI ``prediction_type="v_prediction"``)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        v, a, b = self._predict(x, t, cond)
        return ((a * x - b * v) / (a**2 + b**2)).to(x.dtype)


class X0Denoiser(_NetworkDenoiser):
    """A network trained to predict the clean image (MONAI ``prediction_type="sample"``)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return self._predict(x, t, cond)[0]


class FlowDenoiser(_NetworkDenoiser):
    """A rectified-flow network predicting the velocity ``u = x0 - noise`` (MONAI ``RFlowScheduler`` convention)."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        u, a, b = self._predict(x, t, cond)
        return ((x + b * u) / (a + b)).to(x.dtype)


PREDICTION_TYPES: dict[str, type[_NetworkDenoiser]] = {
    "epsilon": EpsilonDenoiser,
    "v": VDenoiser,
    "x0": X0Denoiser,
    "flow": FlowDenoiser,
}


def make_denoiser(net: Callable[..., torch.Tensor], schedule: Schedule, prediction: str) -> _NetworkDenoiser:
    """The adapter for a network trained with ``prediction`` (``"epsilon"``, ``"v"``, ``"x0"`` or ``"flow"``)."""
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTION_TYPES)}")
    return PREDICTION_TYPES[prediction](net, schedule)


class GaussianDenoiser:
    """The exact denoiser ``E[x0 | x_t]`` when every voxel of the data is independent ``N(mean, std^2)``.

    ``x0_hat = mean + std^2 a / (a^2 std^2 + b^2) (x_t - a mean)`` -- for VP schedules (``a^2 = ab``, ``b^2 = 1 - ab``)
    this is ``mean + std^2 sqrt(ab) / (ab std^2 + 1 - ab) (x_t - sqrt(ab) mean)``. ``mean``/``std`` may be floats or
    tensors broadcastable to one sample. Conditioning keywords are accepted and ignored.
    """

    def __init__(self, mean: float | torch.Tensor, std: float | torch.Tensor, schedule: Schedule) -> None:
        self.mean, self.std, self.schedule = mean, std, schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        a, b = self.schedule.scaling(batch_timesteps(t, x).to(x.device), x.ndim)
        var = torch.as_tensor(self.std, dtype=torch.float64, device=x.device) ** 2
        mean = torch.as_tensor(self.mean, dtype=torch.float64, device=x.device)
        return (mean + var * a / (a**2 * var + b**2) * (x - a * mean)).to(x.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return eps_from_x0(x, self(x, t), t, self.schedule)

    def sample_pushforward(self, x_start: torch.Tensor, t_start: torch.Tensor | float,
                           t_end: torch.Tensor | float | None = None) -> torch.Tensor:
        """Exact probability-flow ODE solution from ``(x_start, t_start)`` to ``t_end`` (``None``: clean data).

        For Gaussian data the flow map is affine: the standardised value ``(x - a mean) / sqrt(a^2 std^2 + b^2)``
        is conserved along each trajectory.
        """
        def affine(t):
            if t is None:
                return 1.0, 0.0
            return self.schedule.scaling(batch_timesteps(t, x_start).to(x_start.device), x_start.ndim)

        var = torch.as_tensor(self.std, dtype=torch.float64, device=x_start.device) ** 2
        a0, b0 = affine(t_start)
        a1, b1 = affine(t_end)
        z = (x_start - a0 * self.mean) / (a0**2 * var + b0**2) ** 0.5
        return (a1 * self.mean + (a1**2 * var + b1**2) ** 0.5 * z).to(x_start.dtype)


class GaussianMixtureDenoiser:
    """The exact denoiser ``E[x0 | x_t]`` when each sample (all non-batch dims flattened to ``D`` values) comes from
    the mixture ``sum_k w_k N(mu_k, std^2 I)``.

    Component ``k`` gives ``x_t ~ N(a mu_k, (a^2 std^2 + b^2) I)`` and ``E[x0 | x_t, k] = mu_k + std^2 a /
    (a^2 std^2 + b^2) (x_t - a mu_k)``; ``x0_hat`` averages these with the posterior responsibilities. ``means`` is
    ``(K, D)``, ``weights`` ``(K,)`` (normalised here). Conditioning keywords are accepted and ignored.
    """

    def __init__(self, means: torch.Tensor, std: float, schedule: Schedule,
                 weights: torch.Tensor | None = None) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        k = self.means.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.log_weights, self.std, self.schedule = (w / w.sum()).log(), float(std), schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        a, b = self.schedule.scaling(batch_timesteps(t, x).to(x.device), 2)  # (B, 1)
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        means = self.means.to(x.device)
        var_t = a**2 * self.std**2 + b**2  # (B, 1)
        dist2 = (flat[:, None, :] - a[:, None] * means[None]).square().sum(-1)  # (B, K)
        logits = self.log_weights.to(x.device) - 0.5 * dist2 / var_t
        resp = torch.softmax(logits, dim=1)  # (B, K)
        per_component = means[None] + (self.std**2 * a / var_t)[:, None] * (flat[:, None, :] - a[:, None] * means[None])
        return (resp[..., None] * per_component).sum(1).reshape(x.shape).to(x.dtype)

    def eps(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return eps_from_x0(x, self(x, t), t, self.schedule)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws from the mixture, ``(n, D)`` float32."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).to(torch.float32)
