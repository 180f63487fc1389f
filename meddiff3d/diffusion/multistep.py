"""Coefficients of the multistep exponential integrators in ``lambda = log(a / b)`` (DPM-Solver++, UniPC).

With data prediction the probability-flow ODE from ``t`` to ``s`` is solved exactly up to the integral of ``x0_hat``:
``x_s = (b_s / b_t) x_t + a_s int_0^h e^(u - h) x0_hat(lambda_t + u) du``, ``h = lambda_s - lambda_t``. A multistep
solver replaces ``x0_hat`` by the polynomial through its last evaluations; the functions here give that integral (and
UniPC's weights) for the sampler loops of :mod:`.samplers`. Coefficients are float64 tensors shaped like ``a``, so
they broadcast per sample in 2D and 3D.
"""

from __future__ import annotations

import torch

__all__ = ["LOWER_ORDER_FINAL_BELOW", "half_log_snr", "multistep_order", "dpmpp_update", "unipc_rhos"]

#: below this many steps the multistep solvers lower their order on the last steps (on the toy mixture this helps
#: up to 15-20 steps; above, it would cost the asymptotic order for nothing)
LOWER_ORDER_FINAL_BELOW = 20


def half_log_snr(coefs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``lambda = log(a / b)``, half the log-SNR: ``-inf`` at pure noise (``a = 0``), ``+inf`` on clean data."""
    a, b = coefs
    return torch.log(a / b)


def multistep_order(order: int, history: list, lam: torch.Tensor, steps_left: int, n_steps: int) -> int:
    """Order of a multistep step: ``order``, lowered at the first steps (warm-up: one point per order; points at
    ``lambda = -inf``, pure noise, do not count), to 1 from pure noise, and with fewer than
    :data:`LOWER_ORDER_FINAL_BELOW` steps at the last ones (``<= steps_left``: first order on the step landing on the
    last timestep, second order on the one before; DPM-Solver's ``lower_order_final``)."""
    if not bool(torch.isfinite(lam).all()):
        return 1
    if n_steps >= LOWER_ORDER_FINAL_BELOW:
        steps_left = order
    return max(1, min(order, 1 + len(history), steps_left))


def dpmpp_update(x: torch.Tensor, x0: torch.Tensor, history: list[tuple[torch.Tensor, torch.Tensor]],
                 lam: torch.Tensor, h: torch.Tensor, b_ratio: torch.Tensor, a_next: torch.Tensor,
                 order: int) -> torch.Tensor:
    """One DPM-Solver++ step of ``order`` 1-3: ``x0_hat`` interpolated in ``lambda`` through ``x0`` (at ``lam``) and
    the last ``order - 1`` of ``history`` (``(lambda, x0_hat)``, newest last), the integral taken exactly.

    Newton form ``x0 + D1 u / h + D2 u^2 / h^2``: ``x_next = b_ratio x - a_next [expm1(-h) x0 - phi2 D1 - (1 - 2 phi2
    / h) D2]`` with ``phi2 = expm1(-h) / h + 1`` (``b_ratio = b_next / b_t``). k-diffusion's and diffusers' 3M weight
    ``D2`` by ``1/2 - phi2 / h``, half the exact integral, which makes them second order.
    """
    phi1 = torch.expm1(-h)
    x_next = b_ratio * x - a_next * phi1 * x0
    if order >= 2:
        lam_1, x0_1 = history[-1]
        r0 = (lam - lam_1) / h
        d1 = (x0 - x0_1) / r0
        phi2 = phi1 / h + 1.0
        if order == 3:
            lam_2, x0_2 = history[-2]
            r1 = (lam_1 - lam_2) / h
            d2 = (d1 - (x0_1 - x0_2) / r1) / (r0 + r1)
            d1 = d1 + r0 * d2
            x_next = x_next + a_next * (1.0 - 2.0 * phi2 / h) * d2
        x_next = x_next + a_next * phi2 * d1
    return x_next


def unipc_rhos(rs: list[torch.Tensor], h: torch.Tensor) -> list[torch.Tensor]:
    """UniPC's ``rho`` (bh2, ``B(h) = expm1(-h)``): ``sum_k rho_k r_k^(i-1) = b_i`` for ``i = 1..len(rs)`` with
    ``b_i = i! h phi_(i+1)(-h) / (1 - e^-h)``; one point gives UniPC's ``rho = 1/2`` (its small-``h`` limit), except
    for a step from pure noise (``h = inf``), whose exact ``rho = 1`` puts all the weight on the newest ``x0_hat``."""
    if len(rs) == 1:
        return [torch.where(torch.isfinite(h), 0.5, 1.0).to(h.dtype)]
    h_phi, factorial, b = torch.expm1(-h) / -h - 1.0, 1.0, []
    for i in range(1, len(rs) + 1):
        b.append(h_phi * factorial / torch.expm1(-h))
        factorial *= i + 1
        h_phi = h_phi / -h - 1.0 / factorial
    # The Vandermonde system in closed form: rho_k = sum_i b_(i+1) [u^i] L_k(u), L_k the Lagrange basis of the r's.
    rho = []
    for k, r_k in enumerate(rs):
        coefficients, denominator = [torch.ones_like(r_k)], torch.ones_like(r_k)
        for j, r_j in enumerate(rs):
            if j != k:  # times (u - r_j) / (r_k - r_j)
                zero = torch.zeros_like(r_k)
                coefficients = [c_low - r_j * c for c_low, c in zip([zero] + coefficients, coefficients + [zero])]
                denominator = denominator * (r_k - r_j)
        rho.append(sum(c * b_i for c, b_i in zip(coefficients, b)) / denominator)
    return rho
