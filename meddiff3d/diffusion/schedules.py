"""Noise schedules: where a noisy sample sits between data and noise at each timestep.

Every schedule answers one question for the samplers and objectives, :meth:`scaling`: the coefficients
``(a_t, b_t)`` in ``x_t = a_t * x0 + b_t * noise``. Two families:

* :class:`NoiseSchedule` -- variance preserving (VP) DDPM schedules, ``a = sqrt(alpha_bar)``, ``b = sqrt(1 - alpha_bar)``,
  with the beta definitions of MONAI's ``DDPMScheduler(schedule=...)`` (``linear_beta``, ``scaled_linear_beta``,
  ``cosine``), so ``alphas_cumprod`` are bit-identical to MONAI's. Timesteps are the discrete integers ``0..T-1`` a
  network was trained on; fractional timesteps interpolate ``log(alpha_bar)`` (the continuous VP-SDE view) and
  ``t = -1`` is clean data (``alpha_bar = 1``).
* :class:`FlowSchedule` -- rectified flow, ``x_t = (1 - s) x0 + s noise`` with flow time ``s = t / T``; timesteps are
  floats in ``[0, T]`` as in MONAI's ``RFlowScheduler``, training times uniform or logit-normal (optionally shifted).

Both are frozen dataclasses that serialise to a plain dict (``to_dict``) saved next to the weights;
:func:`schedule_from_dict` rebuilds either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Union

import torch

from meddiff3d.errors import InputError

from .tensor_utils import append_dims

__all__ = [
    "linear_beta",
    "scaled_linear_beta",
    "cosine_beta",
    "BETA_SCHEDULES",
    "SPACINGS",
    "NoiseSchedule",
    "FlowSchedule",
    "Schedule",
    "schedule_from_dict",
]


def linear_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Betas linear in t (Ho et al. 2020); MONAI ``schedule="linear_beta"``."""
    return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)


def scaled_linear_beta(num_train_timesteps: int, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Square roots of the betas linear in t (latent diffusion); MONAI ``schedule="scaled_linear_beta"``."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2


def cosine_beta(num_train_timesteps: int, s: float = 8e-3) -> torch.Tensor:
    """Cosine alpha_bar (Nichol & Dhariwal 2021) as betas clipped at 0.999; MONAI ``schedule="cosine"``."""
    x = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1)
    alpha_bar = torch.cos(((x / num_train_timesteps) + s) / (1 + s) * torch.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0].item()
    return torch.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, 0.999)


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear_beta": linear_beta,
    "scaled_linear_beta": scaled_linear_beta,
    "cosine": cosine_beta,
}

SPACINGS = ("leading", "trailing", "linspace", "log_snr", "time_quadratic")


def _as_float64(t: torch.Tensor | float) -> torch.Tensor:
    return torch.as_tensor(t).to(torch.float64)


class _AffineSchedule:
    """What both families share: ``x_t = a_t x0 + b_t noise`` with ``(a_t, b_t)`` from :meth:`_coefficients`."""

    def _coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scaling(self, t: torch.Tensor | float, ndim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, b_t)`` with ``x_t = a_t x0 + b_t noise``; with ``ndim`` given, shaped to broadcast on an image."""
        a, b = self._coefficients(t)
        if ndim is not None:
            a, b = append_dims(a, ndim), append_dims(b, ndim)
        return a, b

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``a_t x0 + b_t noise`` per sample; for a :class:`NoiseSchedule` equals MONAI ``DDPMScheduler.add_noise``."""
        a, b = self.scaling(t.to(x0.device), x0.ndim)
        return (a * x0 + b * noise).to(x0.dtype)


@dataclass(frozen=True)
class NoiseSchedule(_AffineSchedule):
    """A discrete variance-preserving schedule, ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise``.

    Args:
        schedule: ``"linear_beta"``, ``"scaled_linear_beta"`` or ``"cosine"`` (MONAI's names).
        num_train_timesteps: T, the number of training timesteps.
        beta_start, beta_end: range of the (scaled) linear betas; ignored by ``cosine``.
        cosine_s: the offset ``s`` of the cosine schedule.

    Coefficient methods take timesteps as tensors (any shape, integer or fractional) and return float64 tensors of
    the same shape; :meth:`scaling` broadcasts them against an image for you.
    """

    schedule: str = "linear_beta"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2
    cosine_s: float = 8e-3
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)
    betas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.schedule not in BETA_SCHEDULES:
            raise InputError(f"unknown noise schedule {self.schedule!r}; valid: {sorted(BETA_SCHEDULES)}")
        if int(self.num_train_timesteps) < 2:
            raise InputError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.schedule == "cosine":
            betas = cosine_beta(self.num_train_timesteps, self.cosine_s)
        else:
            betas = BETA_SCHEDULES[self.schedule](self.num_train_timesteps, self.beta_start, self.beta_end)
        # Cumulative product in float32 as MONAI does (identical values), kept as float64 for the derived maths.
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).to(torch.float64))
        object.__setattr__(self, "betas", betas.to(torch.float64))

    # ---- persistence -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("alphas_cumprod", "betas")}
        return {"type": "NoiseSchedule", **d}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoiseSchedule:
        return cls(**{k: v for k, v in d.items() if k != "type"})

    # ---- coefficients ------------------------------------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """alpha_bar at (possibly fractional) timesteps; log-linear between integers, 1 at ``t <= -1``."""
        t = _as_float64(t)
        table = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).to(t.device)  # index = t + 1
        pos = (t + 1.0).clamp(0.0, float(self.num_train_timesteps))
        lo = pos.floor().clamp(max=self.num_train_timesteps - 1)
        frac = pos - lo
        lo = lo.long()
        between = torch.exp(table[lo].log() * (1.0 - frac) + table[lo + 1].log() * frac)
        exact = table[pos.round().long()]
        return torch.where(pos == pos.round(), exact, between)  # exact table values at integer timesteps

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise-to-signal ratio ``sqrt((1 - alpha_bar) / alpha_bar)`` (k-diffusion's sigma)."""
        ab = self.alpha_bar(t)
        return ((1.0 - ab) / ab).sqrt()

    def log_snr(self, t: torch.Tensor | float) -> torch.Tensor:
        """``log(alpha_bar / (1 - alpha_bar))`` = ``-2 log sigma`` (``+inf`` for clean data)."""
        ab = self.alpha_bar(t)
        return ab.log() - torch.log1p(-ab)

    def alpha_bar_to_t(self, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep with the given alpha_bar: the exact inverse of :meth:`alpha_bar` on ``[-1, T-1]``."""
        ab = _as_float64(alpha_bar)
        neg_log = -torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod]).log().to(ab.device)  # increasing
        x = (-ab.log()).reshape(-1).clamp(0.0, float(neg_log[-1])).contiguous()
        hi = torch.searchsorted(neg_log, x).clamp(1, self.num_train_timesteps)
        lo = hi - 1
        frac = (x - neg_log[lo]) / (neg_log[hi] - neg_log[lo])
        return (lo.to(torch.float64) - 1.0 + frac).reshape(ab.shape)

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Fractional timestep with the given sigma (inverse of :meth:`sigma`; sigma 0 maps to -1, clean)."""
        sigma = _as_float64(sigma)
        return self.alpha_bar_to_t(1.0 / (1.0 + sigma**2))

    def _coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1.0 - ab).sqrt()

    # ---- noising (training and SDEdit; add_noise is inherited) ----------------------------------------------------
    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v-prediction target ``sqrt(ab) noise - sqrt(1 - ab) x0``; equals MONAI ``Scheduler.get_velocity``."""
        a, b = self.scaling(t.to(x0.device), x0.ndim)
        return (a * noise - b * x0).to(x0.dtype)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Training timesteps, uniform integers in ``[0, T)`` (as MONAI's trainers draw them), as float ``(B,)``."""
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=gen_device)
        return t.to(device=device, dtype=torch.float32)

    # ---- inference sub-sequences -------------------------------------------------------------------------------
    def timesteps(self, n_steps: int, spacing: str = "linspace", steps_offset: int = 0) -> torch.Tensor:
        """``n_steps`` descending integer timesteps to sample with (the sampler then lands on clean data).

        * ``"linspace"``: ``round(linspace(T-1-offset, 0, n)) + offset`` -- MONAI 1.6 ``DDIMScheduler.set_timesteps``
          (and ``DDPMScheduler`` with offset 0); always starts at T-1.
        * ``"leading"``: ``arange(n) * (T // n) + offset`` reversed -- diffusers/monai-generative "leading" spacing.
        * ``"trailing"``: ``round(arange(T, 0, -T/n)) - 1`` -- starts at T-1, skips the least noisy steps.
        * ``"log_snr"``: fractional timesteps uniform in log-SNR from T-1 to 0 (float32). Recommended for
          ``dpmpp_2m``: integer spacings put most of the log-SNR range into the last step or two, where the
          second-order extrapolation overshoots.
        * ``"time_quadratic"``: fractional timesteps ``(T-1) (1 - k/(n-1))^2`` (float32; DPM-Solver's
          ``time_quadratic``): few steps at high noise, where the flow is nearly straight, then roughly uniform
          log-SNR steps. Recommended for ``dpmpp_3m`` and ``unipc``: on the toy mixture (exact denoiser, 6-20 steps)
          its error is 4-11x below ``log_snr``'s; there it also beats ``linspace`` for DDIM (2-3x) and ``log_snr``
          for ``dpmpp_2m`` (2-14x), which keeps ``log_snr`` as it does better on single-Gaussian data.
        """
        T = self.num_train_timesteps
        if not 1 <= int(n_steps) <= T:
            raise InputError(f"steps must be in [1, {T}] for a {T}-step schedule, got {n_steps}")
        if not 0 <= int(steps_offset) < T:
            raise InputError(f"steps_offset must be in [0, {T}), got {steps_offset}")
        if spacing == "linspace":
            steps = torch.linspace(T - 1 - steps_offset, 0, n_steps, dtype=torch.float32).round().long() + steps_offset
        elif spacing == "leading":
            steps = (torch.arange(n_steps) * (T // n_steps)).flip(0) + steps_offset
        elif spacing == "log_snr":
            ends = self.log_snr(torch.tensor([T - 1.0, 0.0], dtype=torch.float64))
            log_snr = torch.linspace(float(ends[0]), float(ends[1]), n_steps, dtype=torch.float64)
            return self.alpha_bar_to_t(torch.sigmoid(log_snr)).clamp(0, T - 1).to(torch.float32)
        elif spacing == "time_quadratic":
            return ((T - 1) * torch.linspace(1.0, 0.0, n_steps, dtype=torch.float64) ** 2).to(torch.float32)
        elif spacing == "trailing":
            steps = torch.arange(T, 0, -T / n_steps, dtype=torch.float64).round().long() - 1
        else:
            raise InputError(f"unknown timestep spacing {spacing!r}; valid: {list(SPACINGS)}")
        return steps.clamp(0, T - 1)


@dataclass(frozen=True)
class FlowSchedule(_AffineSchedule):
    """Rectified flow, ``x_t = (1 - s) x0 + s noise`` with flow time ``s = t / T`` (MONAI ``RFlowScheduler``).

    Args:
        num_train_timesteps: T; networks see timesteps ``t = s * T`` (floats) as in MONAI.
        shift: resolution shift ``s' = shift s / (1 + (shift - 1) s)`` of the inference timesteps (1 = none; > 1
            spends more steps at high noise); MONAI's ratio for an image size is :meth:`resolution_shift`.
        sample_method: distribution of the training flow time, MONAI's names: ``"uniform"`` (``s ~ U[0, 1)``) or
            ``"logit-normal"`` (``s = sigmoid(loc + scale z)``, ``z ~ N(0, 1)``; SD3's; MAISI-v2 trains uniform).
        loc, scale: of the logit-normal (``loc > 0`` favours noisier times; ``0, 1``: mode at ``s = 1/2``).
        shift_training: pass the training times through the same shift (MONAI ``use_timestep_transform`` shifts
            both training and inference times); off: the network is trained on the unshifted distribution.

    A model's file keeps all of them (:meth:`to_dict`), so it says how it was trained; a dict without the training
    fields (files written before they existed) loads as uniform, unshifted training -- how those models were trained.
    """

    SAMPLE_METHODS: ClassVar[tuple[str, ...]] = ("uniform", "logit-normal")

    num_train_timesteps: int = 1000
    shift: float = 1.0
    sample_method: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    shift_training: bool = False

    def __post_init__(self) -> None:
        steps = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, (int, float)) or steps != int(steps) or steps < 1:
            raise InputError(f"FlowSchedule num_train_timesteps must be an integer >= 1, got {steps!r}")
        for name in ("shift", "loc", "scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"FlowSchedule {name} must be a finite number, got {value!r}")
        if self.shift <= 0 or self.scale <= 0:
            raise InputError(f"FlowSchedule shift and scale must be > 0, got shift={self.shift}, scale={self.scale}")
        if self.sample_method not in self.SAMPLE_METHODS:
            raise InputError(f"FlowSchedule sample_method must be one of {list(self.SAMPLE_METHODS)}, "
                             f"got {self.sample_method!r}")
        if not isinstance(self.shift_training, bool):
            raise InputError(f"FlowSchedule shift_training must be true or false, got {self.shift_training!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "FlowSchedule", **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FlowSchedule:
        fields = {k: v for k, v in d.items() if k != "type"}
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown FlowSchedule field(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        return cls(**fields)

    @staticmethod
    def resolution_shift(spatial_shape: Sequence[int], base_img_size_numel: int = 32 * 32 * 32,
                         transform_scale: float = 1.0) -> float:
        """MONAI's timestep-transform ratio for images (latents) of ``spatial_shape``:
        ``(prod(shape) / base_img_size_numel) ** (1 / len(shape)) * transform_scale``
        (``monai.networks.schedulers.rectified_flow.timestep_transform``); pass it as ``shift``."""
        numel = math.prod(int(n) for n in spatial_shape)
        return (numel / base_img_size_numel) ** (1.0 / len(spatial_shape)) * float(transform_scale)

    def flow_time(self, t: torch.Tensor | float) -> torch.Tensor:
        """Flow time ``s = t / T`` in ``[0, 1]`` (0 = data, 1 = noise)."""
        return (_as_float64(t) / self.num_train_timesteps).clamp(0.0, 1.0)

    def shifted(self, s: torch.Tensor) -> torch.Tensor:
        """The resolution shift of flow times ``s`` in ``[0, 1]``: ``shift s / (1 + (shift - 1) s)``."""
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)

    def _coefficients(self, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.flow_time(t)
        return 1.0 - s, s

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Training timesteps ``s * T``, float ``(B,)``: flow time ``s`` from :attr:`sample_method` (then shifted
        with ``shift_training``). With the global RNG the draws equal MONAI ``RFlowScheduler.sample_timesteps``
        (``use_discrete_timesteps=False``; ``use_timestep_transform`` = ``shift_training`` with ``shift`` =
        :meth:`resolution_shift`)."""
        gen_device = generator.device if generator is not None else device
        if self.sample_method == "uniform":
            s = torch.rand((batch_size,), generator=generator, device=gen_device, dtype=torch.float32)
        else:
            z = torch.randn((batch_size,), generator=generator, device=gen_device, dtype=torch.float32)
            s = torch.sigmoid(z * self.scale + self.loc)
        if self.shift_training:
            s = self.shifted(s)
        return (s * self.num_train_timesteps).to(device)

    def timesteps(self, n_steps: int, spacing: str = "linspace", steps_offset: int = 0) -> torch.Tensor:
        """``n_steps`` descending float timesteps from ``T`` (pure noise); the sampler then lands on ``t = 0``.

        * ``"linspace"``: flow times ``1, (n-1)/n, ..., 1/n``, then the shift (MONAI ``RFlowScheduler.set_timesteps``
          with ``use_discrete_timesteps=False``);
        * ``"log_snr"``: the same first two and last timesteps, the ones between uniform in log-SNR
          ``2 log((1 - s) / s)`` (the shift only offsets log-SNR, so it keeps the grid uniform). With ``n <= 4`` the
          two spacings agree; on the toy mixture dpmpp_2m does as well on either.
        """
        if isinstance(n_steps, bool) or int(n_steps) != n_steps or int(n_steps) < 1:
            raise InputError(f"steps must be an integer >= 1, got {n_steps!r}")
        if spacing not in ("linspace", "log_snr") or steps_offset:
            raise InputError(f"a FlowSchedule has the timestep spacings 'linspace' and 'log_snr' (no steps_offset), "
                             f"got spacing={spacing!r}, steps_offset={steps_offset}")
        n = int(n_steps)
        s = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        if spacing == "log_snr" and n > 2:
            log_snr = torch.linspace(2 * math.log(1.0 / (n - 1)), 2 * math.log(n - 1.0), n - 1, dtype=torch.float64)
            s = torch.cat([s[:1], torch.sigmoid(-log_snr / 2)])
        return (self.shifted(s) * self.num_train_timesteps).to(torch.float32)


Schedule = Union[NoiseSchedule, FlowSchedule]

_SCHEDULE_TYPES = {"NoiseSchedule": NoiseSchedule, "FlowSchedule": FlowSchedule}


def schedule_from_dict(d: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule saved with ``to_dict()`` (dispatches on its ``"type"``)."""
    kind = d.get("type", "NoiseSchedule")
    if kind not in _SCHEDULE_TYPES:
        raise InputError(f"unknown schedule type {kind!r}; valid: {sorted(_SCHEDULE_TYPES)}")
    return _SCHEDULE_TYPES[kind].from_dict(d)

