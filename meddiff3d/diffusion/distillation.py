"""Progressive distillation (Salimans & Ho 2022): a student that takes ONE DDIM step where its teacher took two.

``DistillationObjective(teacher, schedule, steps=N)`` is a training objective like
:class:`~meddiff3d.diffusion.objectives.DiffusionObjective` (``objective(student, batch) -> per-sample loss (B,)``,
the engine takes its mean). One sample, as in the paper's Algorithm 2:

1. draw a timestep ``t`` of the student's N-step DDIM grid (:func:`distillation_grid`), noise ``x0`` to
   ``x_t = a_t x0 + b_t noise``;
2. with the frozen teacher (no grad), two deterministic DDIM steps (:func:`~.samplers.ddim_step`): ``t`` -> the
   midpoint ``t'`` on the teacher's 2N-step grid -> ``t''``, the next point of the student's grid (clean data after
   the last step), giving ``x_t''``;
3. the target ``x0~`` for which one student DDIM step from ``x_t`` lands exactly on ``x_t''`` (:func:`ddim_target`):
   ``x0~ = (x_t'' - (b_t''/b_t) x_t) / (a_t'' - (b_t''/b_t) a_t)``;
4. the loss ``max(SNR_t, 1) * mean((x0_hat - x0~)^2)`` with ``x0_hat`` the student's denoised estimate.

**The grid.** Two teacher steps must land on the student's next grid point, so the teacher's 2N-step grid has to
contain the student's N-step grid. ``"trailing"`` spacing (``T - 1 - k T/N``; VP schedules) and the flow schedule's
``"linspace"`` are nested for every halving; ``"linspace"`` on a VP schedule (``round(linspace(T-1, 0, N))``) and
``"leading"`` are not. :func:`distillation_spacing` names it, and the student must be sampled on exactly that grid:
``sample(student, noise, schedule, sampler="ddim", steps=N, spacing=distillation_spacing(schedule))`` (what a
distilled model file records in ``meta["sampling"]``). Trailing spacing starts at ``T - 1``, where inference starts.

**The weighting.** The paper's truncated-SNR weight ``max(SNR, 1)`` on the x-space error, kept here in x-space for
every student parameterisation (the gradient is that of the equivalent loss in the prediction's space). For the
v-prediction student (VP: ``x0_hat = a x_t - b v``) it is ``max(SNR, 1) b^2 = max(a^2, b^2)`` times the v-space error:
a plain, well-scaled v-MSE with weights in [1/2, 1], close to the ``SNR + 1`` weighting that v-MSE training itself
implies (``SNR + 1 = 1 / b^2``). For an epsilon student the same loss weighs the noise error by
``max(1, 1/SNR)``, up to ``~10^4`` at ``t = T - 1`` on the anchor schedule: the instability of epsilon-prediction in
few-step distillation the paper reports, which is why v is the main case. The same holds for the target itself: its
denominator is small at high noise (0.0036 for 999 -> 968, the first step of a 32-step student on the anchor
schedule), but a DDIM step's sensitivity to a v output is ``b_t`` times it, so a v teacher's output error (bf16
autocast: ~0.4%) reaches ``x0~`` unamplified; an epsilon teacher's is amplified by ``b_t / a_t`` (~100 at t = 999).

**Guidance folded in.** With ``guidance_scale = w != 1`` the teacher is
:class:`~.guidance.ClassifierFreeGuidance` ``(teacher, w, null_cond)``, so the student learns the guided sampler and
is later sampled with guidance 1 (one pass per step instead of two). Samples whose condition was dropped (conditioning
dropout, as in :class:`DiffusionObjective`) carry the null condition, for which the guided teacher IS the unguided
unconditional teacher (its conditional and unconditional passes get the same input): the student keeps sampling
unconditionally too.

Randomness (the grid index, the noise, the dropout -- in that order) comes from the global torch RNG, which the engine
seeds and checkpoints, unless a ``generator`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from meddiff3d.checks import check_number
from meddiff3d.errors import InputError

from .denoisers import PREDICTION_TYPES, make_denoiser
from .guidance import ClassifierFreeGuidance
from .objectives import DiffusionObjective
from .samplers import ddim_step
from .sampling import sampling_timesteps
from .schedules import FlowSchedule, Schedule
from .tensor_utils import append_dims, rand, randn

__all__ = ["DISTILLATION_SAMPLER", "distillation_spacing", "distillation_grid", "ddim_target", "truncated_snr_weight",
           "DistillationObjective"]

#: the sampler a distilled student is trained for (and must be sampled with)
DISTILLATION_SAMPLER = "ddim"

Coefs = tuple[torch.Tensor, torch.Tensor]


def distillation_spacing(schedule: Schedule) -> str:
    """The timestep spacing whose grids are nested under halving: ``"linspace"`` for a :class:`FlowSchedule`,
    ``"trailing"`` for a VP :class:`~.schedules.NoiseSchedule`."""
    return "linspace" if isinstance(schedule, FlowSchedule) else "trailing"


def distillation_grid(schedule: Schedule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(student, teacher)`` timesteps (float32, descending): the student's ``steps``-step DDIM grid and the
    teacher's ``2 * steps``-step grid, as :func:`~.sampling.sampling_timesteps` gives them for
    :func:`distillation_spacing`; an :class:`InputError` unless the teacher's even entries are the student's grid."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"distillation: the student's steps must be an integer >= 1, got {steps!r}")
    spacing = distillation_spacing(schedule)
    student, _ = sampling_timesteps(schedule, steps, spacing)
    teacher, _ = sampling_timesteps(schedule, 2 * steps, spacing)
    student, teacher = student.to(torch.float32), teacher.to(torch.float32)
    if not torch.equal(teacher[::2], student):
        raise InputError(f"distillation: the {2 * steps}-step {spacing!r} grid of {schedule!r} does not contain the "
                         f"{steps}-step grid (two teacher steps must land on a student grid point)")
    return student, teacher


def ddim_target(x_t: torch.Tensor, x_s: torch.Tensor, t_coefs: Coefs, s_coefs: Coefs) -> torch.Tensor:
    """The ``x0`` for which one deterministic DDIM step from ``x_t`` (coefficients ``(a_t, b_t)``) lands on ``x_s``
    (``(a_s, b_s)``): ``(x_s - (b_s/b_t) x_t) / (a_s - (b_s/b_t) a_t)``, the inverse of
    :func:`~.samplers.ddim_step` ``(x_t, x0, t_coefs, s_coefs)`` in ``x0`` (computed in float64)."""
    (a_t, b_t), (a_s, b_s) = t_coefs, s_coefs
    ratio = b_s / b_t
    return ((x_s.double() - ratio * x_t.double()) / (a_s - ratio * a_t)).to(x_t.dtype)


def truncated_snr_weight(t_coefs: Coefs) -> torch.Tensor:
    """``max(SNR, 1)`` per sample (``SNR = a^2 / b^2``), shape ``(B,)``: the paper's x-space loss weight."""
    a, b = t_coefs
    return ((a / b) ** 2).clamp(min=1.0).reshape(a.shape[0])


def _grid_coefs(schedule: Schedule, t: torch.Tensor, clean: torch.Tensor, ndim: int) -> Coefs:
    """``(a, b)`` at per-sample timesteps ``t``, ``(1, 0)`` where ``clean``; shaped ``(B, 1, ...)``, float64."""
    a, b = schedule.scaling(t, ndim)
    clean = append_dims(clean, ndim)
    return torch.where(clean, torch.ones_like(a), a), torch.where(clean, torch.zeros_like(b), b)


class DistillationObjective(torch.nn.Module):
    """Progressive-distillation loss per sample for one batch (see the module docstring).

    Args:
        teacher: the frozen teacher, a network called as ``net(x, timesteps=t, **cond)`` (a MONAI U-Net, the previous
            round's student, or any callable; ``torch.nn.Module`` teachers are frozen, kept in eval mode and follow
            the objective's device).
        schedule: the teacher's (and student's) noise schedule.
        steps: N, the student's DDIM steps (the teacher takes 2N).
        teacher_prediction: what the teacher network predicts (``"epsilon"``, ``"v"``, ``"x0"``, ``"flow"``).
        prediction: what the student predicts; ``None``: the teacher's.
        guidance_scale: classifier-free guidance ``w`` of the teacher folded into the student (1: none).
        cond_dropout, null_cond, concat_keys, context_key, network_wrapper, generator: as for
            :class:`DiffusionObjective` (the same conditioning plumbing, for the teacher and the student alike).

    ``objective(student, batch)`` with ``batch["image"]`` the clean data ``(B, C, *spatial)`` returns ``(B,)``.
    """

    def __init__(self, teacher: Callable[..., torch.Tensor], schedule: Schedule, steps: int, *,
                 teacher_prediction: str = "v", prediction: str | None = None, guidance_scale: float = 1.0,
                 cond_dropout: float = 0.0, null_cond: Mapping[str, torch.Tensor | None] | None = None,
                 concat_keys: str | Sequence[str] = ("concat",), context_key: str = "context",
                 network_wrapper: Callable[[Any], Callable[..., torch.Tensor]] | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if teacher_prediction not in PREDICTION_TYPES:
            raise InputError(f"unknown teacher prediction type {teacher_prediction!r}; valid: {list(PREDICTION_TYPES)}")
        prediction = teacher_prediction if prediction is None else prediction
        guidance_scale = check_number("guidance_scale", guidance_scale, 0.0)
        # the same conditioning (dropout to the null condition) and checks as the ordinary objective
        self.base = DiffusionObjective(schedule, prediction, cond_dropout=cond_dropout, null_cond=null_cond,
                                       concat_keys=concat_keys, context_key=context_key, generator=generator,
                                       network_wrapper=network_wrapper)
        student, teacher_grid = distillation_grid(schedule, steps)
        self.register_buffer("student_timesteps", student, persistent=False)
        self.register_buffer("teacher_timesteps", teacher_grid, persistent=False)
        self.schedule, self.steps, self.spacing = schedule, int(steps), distillation_spacing(schedule)
        self.teacher_prediction, self.prediction, self.guidance_scale = teacher_prediction, prediction, guidance_scale
        if isinstance(teacher, torch.nn.Module):
            teacher.requires_grad_(False).eval()
        self.teacher = teacher

    def train(self, mode: bool = True) -> DistillationObjective:
        super().train(mode)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.eval()  # the teacher is a fixed function: no dropout, no norm statistics updates
        return self

    @property
    def sampling(self) -> dict[str, Any]:
        """How the student is sampled: ``{"sampler": "ddim", "steps": N, "spacing": ...}`` (a model's meta entry)."""
        return {"sampler": DISTILLATION_SAMPLER, "steps": self.steps, "spacing": self.spacing}

    def _denoiser(self, network: Any, prediction: str, cond: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        """``network`` wrapped as :class:`DiffusionObjective` feeds it, as a denoiser of ``prediction``."""
        return make_denoiser(self.base.conditioned_network(network, cond), self.schedule, prediction)

    def targets(self, x_t: torch.Tensor, index: torch.Tensor, cond: Mapping[str, Any]) -> torch.Tensor:
        """``x0~`` per sample: the teacher's two DDIM steps from ``x_t`` at the student's grid points ``index``,
        inverted through one student step (no grad)."""
        t, mid, s, clean = self._grid(index)
        ndim = x_t.ndim
        teacher = self._denoiser(self.teacher, self.teacher_prediction, cond)
        if self.guidance_scale != 1.0:
            null = self.base.null_cond
            null = None if null is None else self.base.network_keywords(null)
            teacher = ClassifierFreeGuidance(teacher, self.guidance_scale, null)
        kwargs = self.base.network_keywords(cond)
        no = torch.zeros_like(clean)
        c_t, c_mid = _grid_coefs(self.schedule, t, no, ndim), _grid_coefs(self.schedule, mid, no, ndim)
        c_s = _grid_coefs(self.schedule, s, clean, ndim)
        with torch.no_grad():
            x_mid = ddim_step(x_t, teacher(x_t, t, **kwargs), c_t, c_mid)
            x_s = ddim_step(x_mid, teacher(x_mid, mid, **kwargs), c_mid, c_s)
            return ddim_target(x_t, x_s, c_t, c_s)

    def _grid(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(t, t', t'', t'' is clean)`` of the student's grid points ``index``."""
        last = self.steps - 1
        t = self.student_timesteps[index]
        mid = self.teacher_timesteps[2 * index + 1]
        s = self.student_timesteps[(index + 1).clamp(max=last)]
        return t, mid, s, index == last

    def forward(self, network: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        x0 = batch["image"]
        u = rand((x0.shape[0],), self.base.generator, x0.float())
        index = (u * self.steps).long().clamp(max=self.steps - 1).to(self.student_timesteps.device)
        noise = randn(x0.shape, self.base.generator, x0)
        t = self.student_timesteps[index]
        x_t = self.schedule.add_noise(x0, noise, t)
        cond = self.base.conditioning(batch, x0)
        target = self.targets(x_t, index, cond)
        x0_hat = self._denoiser(network, self.prediction, cond)(x_t, t, **self.base.network_keywords(cond))
        weight = truncated_snr_weight(self.schedule.scaling(t, x0.ndim))
        per_sample = (x0_hat.float() - target.float()).square().flatten(1).mean(1)
        return per_sample * weight.to(per_sample)

    def extra_repr(self) -> str:
        return (f"{self.schedule!r}, steps={self.steps} (teacher {2 * self.steps}, {self.spacing!r} grid), "
                f"teacher_prediction={self.teacher_prediction!r}, prediction={self.prediction!r}, "
                f"guidance_scale={self.guidance_scale:g}, cond_dropout={self.base.cond_dropout}")
