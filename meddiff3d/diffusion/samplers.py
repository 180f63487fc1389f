"""Samplers: pure functions ``sample_x(denoiser, x_T, timesteps, schedule, ...) -> x_0``.

``denoiser(x_t, t, **cond) -> x0_hat`` is the one interface (see :mod:`.denoisers`); guidance, conditioning and
coordinate channels are wrappers around it, never branches here. ``timesteps`` is any descending sequence of
timesteps to evaluate the denoiser at (e.g. ``schedule.timesteps(50)``); step ``i`` moves the sample from
``timesteps[i]`` to ``timesteps[i + 1]`` and the last step lands on clean data. ``prev_timesteps`` overrides where
each step lands (``< 0`` = clean): MONAI's ``DDIMScheduler.step`` lands on ``t - T // n`` whatever the next timestep
is, so ``prev_timesteps=timesteps - T // n`` reproduces its loop exactly.

All coefficients come from ``schedule.scaling(t) = (a, b)`` with ``x_t = a x0 + b noise``, so every sampler works
with both VP (:class:`NoiseSchedule`) and rectified-flow (:class:`FlowSchedule`) schedules, in 2D and 3D.
Randomness comes only from ``generator`` (a ``torch.Generator`` or an int seed; ``None`` = global RNG). Multistep
history is a local variable. ``callback(step_index, t, x, x0_hat)`` is called once per denoiser evaluation of the
main trajectory, e.g. ``callback=lambda *a: progress.update()``. The multistep solvers' coefficients (DPM-Solver++,
UniPC) are in :mod:`.multistep`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, Optional

import torch

from meddiff3d.errors import InputError

from .multistep import dpmpp_update, half_log_snr, multistep_order, unipc_rhos
from .schedules import Schedule
from .tensor_utils import append_dims, as_generator, batch_timesteps, randn

__all__ = [
    "Callback",
    "step_pairs",
    "ddim_step",
    "ddpm_step",
    "renoise",
    "sample_ddpm",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_dpmpp_3m",
    "sample_unipc",
    "sample_euler",
    "sample_heun",
    "SAMPLERS",
    "get_sampler",
]

Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Any]
Timesteps = Sequence[float] | torch.Tensor
Coefs = tuple[torch.Tensor, torch.Tensor]


def step_pairs(timesteps: Timesteps,
               prev_timesteps: Timesteps | None = None) -> Iterator[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(t, t_next)`` for each step; ``t_next is None`` means the step lands on clean data."""
    ts = torch.as_tensor(timesteps).to(torch.float32).reshape(-1)
    if prev_timesteps is None:
        nexts = list(ts[1:]) + [None]
    else:
        prev = torch.as_tensor(prev_timesteps).to(torch.float32).reshape(-1)
        if prev.shape != ts.shape:
            raise InputError(f"prev_timesteps has {prev.numel()} entries, timesteps {ts.numel()}")
        nexts = [None if p < 0 else p for p in prev]
    return zip(ts, nexts)


def _coefs(schedule: Schedule, t: Optional[torch.Tensor], x: torch.Tensor) -> Coefs:
    """``(a, b)`` at timestep ``t`` shaped ``(B, 1, ...)`` (float64); ``t=None`` is clean data, ``(1, 0)``."""
    if t is None:
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return append_dims(one, x.ndim), append_dims(torch.zeros_like(one), x.ndim)
    return schedule.scaling(batch_timesteps(t, x), x.ndim)


def _eps(x: torch.Tensor, x0: torch.Tensor, coefs: Coefs) -> torch.Tensor:
    a, b = coefs
    return (x - a * x0) / b


def ddim_step(x: torch.Tensor, x0: torch.Tensor, t_coefs: Coefs, next_coefs: Coefs, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM step (Song et al. 2021) from ``x`` at ``t`` to ``t_next`` given ``x0_hat``; ``eta=1`` is ancestral."""
    (a_t, b_t), (a_s, b_s) = t_coefs, next_coefs
    eps = _eps(x, x0, t_coefs)
    x_next = a_s * x0
    if eta > 0:
        var = eta**2 * (b_s / b_t) ** 2 * (b_t**2 - (a_t / a_s) ** 2 * b_s**2)
        x_next = x_next + (b_s**2 - var).clamp(min=0).sqrt() * eps + var.sqrt() * randn(x.shape, generator, x)
    else:
        x_next = x_next + b_s * eps
    return x_next.to(x.dtype)


def ddpm_step(x: torch.Tensor, x0: torch.Tensor, t_coefs: Coefs, next_coefs: Coefs,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One ancestral step: a draw from the posterior ``q(x_s | x_t, x0_hat)`` (any gap ``t -> s``; none at ``s`` clean)."""
    (a_t, b_t), (a_s, b_s) = t_coefs, next_coefs
    a_ts = a_t / a_s
    var_ts = b_t**2 - a_ts**2 * b_s**2  # variance of q(x_t | x_s)
    mean = (a_ts * b_s**2 / b_t**2) * x + (a_s * var_ts / b_t**2) * x0
    if bool((b_s > 0).any()):
        mean = mean + (var_ts * b_s**2 / b_t**2).sqrt() * randn(x.shape, generator, x)
    return mean.to(x.dtype)


def renoise(x_s: torch.Tensor, s_coefs: Coefs, t_coefs: Coefs, generator: torch.Generator | None = None) -> torch.Tensor:
    """A draw from the forward process ``q(x_t | x_s)`` for ``t`` noisier than ``s`` (RePaint's jump back)."""
    (a_s, b_s), (a_t, b_t) = s_coefs, t_coefs
    a_ts = a_t / a_s
    std = (b_t**2 - a_ts**2 * b_s**2).clamp(min=0).sqrt()
    return (a_ts * x_s + std * randn(x_s.shape, generator, x_s)).to(x_s.dtype)


def _one_step_loop(step: Callable[..., torch.Tensor], denoiser: Callable[..., torch.Tensor], x: torch.Tensor,
                   timesteps: Timesteps, schedule: Schedule, generator: torch.Generator | int | None,
                   callback: Callback | None, cond: Mapping[str, Any] | None,
                   prev_timesteps: Timesteps | None) -> torch.Tensor:
    """The loop of the one-step samplers: one denoiser call per timestep, then
    ``x = step(x, x0_hat, t_coefs, next_coefs, generator=generator)``."""
    generator = as_generator(generator, x.device)
    cond = dict(cond or {})
    for i, (t, t_next) in enumerate(step_pairs(timesteps, prev_timesteps)):
        x0 = denoiser(x, batch_timesteps(t, x), **cond)
        if callback is not None:
            callback(i, t, x, x0)
        x = step(x, x0, _coefs(schedule, t, x), _coefs(schedule, t_next, x), generator=generator)
    return x


@torch.no_grad()
def sample_ddpm(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                generator: torch.Generator | int | None = None, callback: Callback | None = None,
                cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020) with the exact posterior for any sub-sequence of timesteps.

    With all T timesteps this is MONAI's ``DDPMScheduler`` loop (``variance_type="fixed_small"``, no clipping).
    """
    return _one_step_loop(ddpm_step, denoiser, x, timesteps, schedule, generator, callback, cond, prev_timesteps)


@torch.no_grad()
def sample_ddim(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                eta: float = 0.0, generator: torch.Generator | int | None = None, callback: Callback | None = None,
                cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021): deterministic probability-flow steps at ``eta=0``, ancestral at ``eta=1``."""
    return _one_step_loop(partial(ddim_step, eta=eta), denoiser, x, timesteps, schedule, generator, callback, cond,
                          prev_timesteps)


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule,
                    *, generator: torch.Generator | int | None = None, callback: Callback | None = None,
                    cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): second-order multistep in log-SNR, data prediction, deterministic.

    With ``lambda = log(a / b)`` and ``h = lambda_next - lambda_t``:
    ``x_next = (b_next / b_t) x - a_next expm1(-h) D`` where ``D`` is ``x0_hat`` extrapolated with the previous
    step's ``x0_hat`` (``D = (1 + 1/2r) x0_i - 1/2r x0_{i-1}``, ``r = h_prev / h``); first order on the first step
    and on the final step to clean data. ``generator`` is accepted for a uniform signature and unused.
    """
    cond = dict(cond or {})
    x0_prev: torch.Tensor | None = None
    h_prev: torch.Tensor | None = None
    for i, (t, t_next) in enumerate(step_pairs(timesteps, prev_timesteps)):
        x0 = denoiser(x, batch_timesteps(t, x), **cond)
        if callback is not None:
            callback(i, t, x, x0)
        if t_next is None:
            x = x0
            continue
        (a_t, b_t), (a_s, b_s) = _coefs(schedule, t, x), _coefs(schedule, t_next, x)
        h = torch.log(a_s / b_s) - torch.log(a_t / b_t)  # +inf when a_t = 0 (pure noise): a plain DDIM step
        denoised = x0
        if x0_prev is not None:
            half_inv_r = h / (2.0 * h_prev)  # 1 / (2r); 0 after a step from pure noise
            denoised = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
        x = ((b_s / b_t) * x - a_s * torch.expm1(-h) * denoised).to(x.dtype)
        x0_prev, h_prev = x0, h
    return x


@torch.no_grad()
def sample_dpmpp_3m(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule,
                    *, generator: torch.Generator | int | None = None, callback: Callback | None = None,
                    cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) (Lu et al. 2022): third-order multistep in ``lambda = log(a / b)``, data prediction,
    deterministic; ``generator`` is unused.

    ``x0_hat`` is interpolated through the last three evaluations and integrated exactly (:func:`.dpmpp_update`;
    k-diffusion's and diffusers' 3M are second order). Lower order on the first two steps (warm-up) and, below
    :data:`.LOWER_ORDER_FINAL_BELOW` steps, on the last two before clean data (first order landing on the last
    timestep, second order on the step before: a long extrapolation in ``lambda`` overshoots where ``x0_hat``
    saturates at low noise); the final step to clean data is ``x0_hat``, as in :func:`sample_dpmpp_2m`.
    Recommended spacing ``"time_quadratic"``.
    """
    cond = dict(cond or {})
    pairs = list(step_pairs(timesteps, prev_timesteps))
    n_noisy = sum(t_next is not None for _, t_next in pairs)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, x0_hat) of earlier evaluations, newest last
    for i, (t, t_next) in enumerate(pairs):
        x0 = denoiser(x, batch_timesteps(t, x), **cond)
        if callback is not None:
            callback(i, t, x, x0)
        if t_next is None:
            x = x0
            continue
        (a_t, b_t), (a_s, b_s) = _coefs(schedule, t, x), _coefs(schedule, t_next, x)
        lam = half_log_snr((a_t, b_t))
        order = multistep_order(3, history, lam, n_noisy - i, len(pairs))
        x = dpmpp_update(x, x0, history, lam, half_log_snr((a_s, b_s)) - lam, b_s / b_t, a_s, order).to(x.dtype)
        if bool(torch.isfinite(lam).all()):
            history = (history + [(lam, x0)])[-2:]
    return x


@torch.no_grad()
def sample_unipc(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                 order: int = 2, generator: torch.Generator | int | None = None, callback: Callback | None = None,
                 cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """UniPC (Zhao et al. 2023), bh2 variant, data prediction, deterministic; ``generator`` is unused.

    Each step predicts with UniP-``order`` (``x0_hat`` interpolated in ``lambda`` through the last ``order``
    evaluations; UniP-2 is DPM-Solver++(2M)), then, once the denoiser has been evaluated at the predicted sample
    for the next step, corrects that sample with UniC, the same update with the new ``x0_hat`` as one more
    interpolation point, one order higher (``order=2``: third order, ``3``: fourth). No extra denoiser calls: the
    corrected sample continues with the ``x0_hat`` evaluated at the predicted one. Warm-up and final orders as
    :func:`sample_dpmpp_3m`. The final step to clean data is ``x0_hat + (x_corrected - x) / a``, the step taken with
    the model's noise estimate, so the last correction is not discarded (``x0_hat`` alone ignores it). ``order=2``
    (the default) beat ``3`` at 8-15 steps on the toy mixture; recommended spacing ``"time_quadratic"``.
    """
    if order not in (1, 2, 3):
        raise InputError(f"unipc order must be 1, 2 or 3, got {order!r}")
    cond = dict(cond or {})
    pairs = list(step_pairs(timesteps, prev_timesteps))
    n_noisy = sum(t_next is not None for _, t_next in pairs)
    history: list[tuple[torch.Tensor, torch.Tensor]] = []  # (lambda, x0_hat) of earlier evaluations, newest last
    last = None  # the previous step, for the corrector: (first-order part, a_next * B(h), h, r_k, D_k, x0_hat)
    for i, (t, t_next) in enumerate(pairs):
        x0 = denoiser(x, batch_timesteps(t, x), **cond)
        if callback is not None:
            callback(i, t, x, x0)
        if last is not None:
            base, a_bh, h_prev, rs, ds, x0_prev = last
            rho = unipc_rhos(rs + [torch.ones_like(h_prev)], h_prev)
            corrected = base - a_bh * (sum((r * d for r, d in zip(rho, ds)), rho[-1] * (x0 - x0_prev)))
            if t_next is None:
                x0 = x0 + (corrected - x) / _coefs(schedule, t, x)[0]
            x = corrected.to(x.dtype)
        if t_next is None:
            x = x0.to(x.dtype)
            continue
        (a_t, b_t), (a_s, b_s) = _coefs(schedule, t, x), _coefs(schedule, t_next, x)
        lam = half_log_snr((a_t, b_t))
        h = half_log_snr((a_s, b_s)) - lam
        p = multistep_order(order, history, lam, n_noisy - i, len(pairs))
        past = history[::-1][:p - 1]  # newest first
        rs = [(lam_k - lam) / h for lam_k, _ in past]
        ds = [(x0_k - x0) / r for (_, x0_k), r in zip(past, rs)]
        a_bh = a_s * torch.expm1(-h)
        base = (b_s / b_t) * x - a_bh * x0
        x_next = base if p == 1 else base - a_bh * sum(r * d for r, d in zip(unipc_rhos(rs, h), ds))
        last = (base, a_bh, h, rs, ds, x0)
        x = x_next.to(x.dtype)
        if bool(torch.isfinite(lam).all()):
            history = (history + [(lam, x0)])[-2:]
    return x


def _rectified(coefs: Coefs) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale ``c = a + b`` and flow time ``tau = b / c``: ``x / c = (1 - tau) x0 + tau noise`` for any schedule."""
    a, b = coefs
    return a + b, b / (a + b)


def _flow_solver(denoiser, x, timesteps, schedule, second_order, callback, cond, prev_timesteps):
    cond = dict(cond or {})
    for i, (t, t_next) in enumerate(step_pairs(timesteps, prev_timesteps)):
        x0 = denoiser(x, batch_timesteps(t, x), **cond)
        if callback is not None:
            callback(i, t, x, x0)
        (c_t, tau_t), (c_s, tau_s) = _rectified(_coefs(schedule, t, x)), _rectified(_coefs(schedule, t_next, x))
        y = x / c_t
        slope = (y - x0) / tau_t  # d y / d tau = noise - x0
        y_next = y + (tau_s - tau_t) * slope
        if second_order and t_next is not None:
            x_euler = (c_s * y_next).to(x.dtype)
            x0_next = denoiser(x_euler, batch_timesteps(t_next, x), **cond)
            slope_next = (y_next - x0_next) / tau_s
            y_next = y + (tau_s - tau_t) * 0.5 * (slope + slope_next)
        x = (c_s * y_next).to(x.dtype)
    return x


@torch.no_grad()
def sample_euler(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                 generator: torch.Generator | int | None = None, callback: Callback | None = None,
                 cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """Euler on the rectified-flow ODE ``dy/dtau = noise_hat - x0_hat`` (``y = x / (a + b)``, ``tau = b / (a + b)``).

    For a :class:`FlowSchedule` this is plain rectified-flow Euler (``y = x``, ``tau = t / T``), i.e. MONAI's
    ``RFlowScheduler.step``; for a VP schedule it integrates the same probability-flow ODE.
    """
    return _flow_solver(denoiser, x, timesteps, schedule, False, callback, cond, prev_timesteps)


@torch.no_grad()
def sample_heun(denoiser: Callable[..., torch.Tensor], x: torch.Tensor, timesteps: Timesteps, schedule: Schedule, *,
                generator: torch.Generator | int | None = None, callback: Callback | None = None,
                cond: Mapping[str, Any] | None = None, prev_timesteps: Timesteps | None = None) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector) on the rectified-flow ODE; Euler on the final step to clean data."""
    return _flow_solver(denoiser, x, timesteps, schedule, True, callback, cond, prev_timesteps)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp_3m": sample_dpmpp_3m,
    "unipc": sample_unipc,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler registered as ``name`` (a key of :data:`SAMPLERS`)."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None
