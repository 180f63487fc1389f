"""The training objective: one callable, ``objective(network, batch) -> per-sample loss (B,)``.

This is the interface the training engine uses (it takes ``.mean()`` and back-propagates)::

    objective = DiffusionObjective(NoiseSchedule("scaled_linear_beta", beta_start=0.0015, beta_end=0.0205),
                                   prediction="epsilon", cond_dropout=0.1)
    loss = objective(unet, {"image": x0, "concat": covariates, "context": context}).mean()

One training step, as in EDM's loss classes: draw timesteps and noise, noise the image (``x_t = a x0 + b noise``;
for VP schedules identical to MONAI ``DDPMScheduler.add_noise`` -- the ``monai_parity`` guarantee, tested), drop the
conditioning of random samples, call the network as ``net(cat([x_t, *concat]), timesteps=t, context=...)`` and
compare with the target of the prediction type:

==========  =====================  ============================
prediction  target                 denoiser adapter at inference
==========  =====================  ============================
epsilon     noise                  EpsilonDenoiser
v           a noise - b x0         VDenoiser
x0          x0                     X0Denoiser
flow        x0 - noise             FlowDenoiser (with FlowSchedule)
==========  =====================  ============================

Timesteps come from ``schedule.sample_timesteps``: uniform integers for a :class:`NoiseSchedule`; for a
:class:`FlowSchedule` ``t = s T`` with flow time ``s`` uniform or logit-normal (``sample_method``, ``loc``,
``scale``; optionally shifted), as MONAI's ``RFlowScheduler`` draws them. Rectified-flow training is
``DiffusionObjective(FlowSchedule(), "flow")``: MONAI's velocity ``x0 - noise``, unweighted as in MAISI-v2 (uniform
``s``; ``FlowSchedule(sample_method="logit-normal")`` for SD3's). ``"epsilon"`` is refused on a flow schedule: its
``x0`` estimate ``(x_t - s eps) / (1 - s)`` is undefined at pure noise (``s = 1``), where every flow sampler starts.

Randomness (timesteps, noise, dropout -- drawn in that order) comes from the global torch RNG, which the engine
seeds and checkpoints, unless a ``generator`` is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from meddiff3d.errors import InputError

from .conditioning import ConcatConditioning
from .denoisers import PREDICTION_TYPES
from .guidance import null_conditioning
from .schedules import FlowSchedule, Schedule
from .tensor_utils import append_dims, rand, randn

__all__ = ["prediction_target", "min_snr_weight", "DiffusionObjective"]

LOSSES = ("mse", "l1")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise InputError(f"unknown prediction type {prediction!r}; valid: {list(PREDICTION_TYPES)}")


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                      schedule: Schedule) -> torch.Tensor:
    """What a network trained with ``prediction`` should output for ``x_t = a x0 + b noise``."""
    _check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "flow":
        return x0 - noise
    a, b = schedule.scaling(t.to(x0.device), x0.ndim)
    return (a * noise - b * x0).to(x0.dtype)


def min_snr_weight(prediction: str, t: torch.Tensor, schedule: Schedule, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), shape ``(B,)``.

    The x0-space weight ``min(SNR, gamma)`` (``SNR = a^2 / b^2``) converted to the prediction's space by the squared
    derivative of x0_hat with respect to the prediction: ``min(SNR, gamma) / SNR`` for epsilon,
    ``min(SNR, gamma) / (SNR + 1)`` for v (VP), ``min(SNR, gamma)`` for x0, ``min(SNR, gamma) b^2 / (a + b)^2`` for flow
    (on a :class:`FlowSchedule`: ``min(((1 - s) / s)^2, gamma) s^2``, which vanishes towards pure noise).
    """
    _check_prediction(prediction)
    a, b = schedule.scaling(t)
    snr = (a / b) ** 2
    dx0_dprediction = {
        "epsilon": b / a,
        "v": b / (a**2 + b**2),
        "x0": torch.ones_like(a),
        "flow": b / (a + b),
    }[prediction]
    return snr.clamp(max=gamma) * dx0_dprediction**2


class DiffusionObjective:
    """Denoising loss per sample for one batch.

    Args:
        schedule: :class:`NoiseSchedule` (VP) or :class:`FlowSchedule`.
        prediction: what the network predicts: ``"epsilon"``, ``"v"``, ``"x0"`` or ``"flow"``.
        min_snr_gamma: if set, Min-SNR-gamma weighting (typically 5).
        cond_dropout: probability of replacing a sample's conditioning by the null condition (for
            classifier-free guidance; one model then samples conditionally and unconditionally).
        null_cond: the null condition per batch key, as in :func:`~.guidance.null_conditioning`: ``None`` = zeros
            for every conditioning key; a mapping drops only its keys, each to its tensor or zeros (``None``).
        concat_keys: batch keys concatenated (in this order) to the noisy image along channels; each is
            ``(B, C, *spatial)`` or a ``(B, C)`` vector broadcast over space.
        context_key: batch key passed to the network as ``context=`` (cross-attention, ``(B, S, D)``).
        keyword_keys: batch keys passed to the network as keywords of their own name (e.g. ``class_labels``
            ``(B,)``, MONAI's class embedding).
        loss: ``"mse"`` or ``"l1"``, averaged over all non-batch dims.
        network_wrapper: ``wrapper(network) -> callable`` applied to the network before the channel conditioning,
            e.g. ``lambda net: AppendCoordinates(net, CoordinateChannels())``; inference wraps the same way, so
            training and sampling see identical inputs.
        generator: a ``torch.Generator`` for all draws; ``None`` = global torch RNG.

    ``objective(network, batch)`` with ``batch["image"]`` the clean target ``(B, C, *spatial)`` returns ``(B,)``.
    Batch keys other than the image and the conditioning keys (e.g. metadata) are ignored.
    """

    def __init__(self, schedule: Schedule, prediction: str = "epsilon", min_snr_gamma: float | None = None,
                 cond_dropout: float = 0.0, null_cond: Mapping[str, torch.Tensor | None] | None = None,
                 concat_keys: str | Sequence[str] = ("concat",), context_key: str = "context", loss: str = "mse",
                 generator: torch.Generator | None = None,
                 network_wrapper: Callable[[Any], Callable[..., torch.Tensor]] | None = None,
                 keyword_keys: str | Sequence[str] = ()) -> None:
        _check_prediction(prediction)
        if prediction == "epsilon" and isinstance(schedule, FlowSchedule):
            raise InputError("prediction 'epsilon' cannot be sampled on a FlowSchedule (x0 = (x_t - s eps) / (1 - s) "
                             "is undefined at pure noise, s = 1); use prediction 'flow' (MONAI RFlow), 'v' or 'x0'")
        if not 0.0 <= cond_dropout <= 1.0:
            raise InputError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
        if loss not in LOSSES:
            raise InputError(f"unknown loss {loss!r}; valid: {list(LOSSES)}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise InputError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        self.schedule, self.prediction, self.min_snr_gamma = schedule, prediction, min_snr_gamma
        self.cond_dropout, self.null_cond, self.loss, self.generator = float(cond_dropout), null_cond, loss, generator
        self.concat_keys = (concat_keys,) if isinstance(concat_keys, str) else tuple(concat_keys)
        self.context_key = context_key
        self.keyword_keys = (keyword_keys,) if isinstance(keyword_keys, str) else tuple(keyword_keys)
        self.network_wrapper = network_wrapper

    def conditioning(self, batch: Mapping[str, Any], like: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's conditioning by key, with the dropped samples replaced by the null condition."""
        keys = [k for k in (*self.concat_keys, self.context_key, *self.keyword_keys) if batch.get(k) is not None]
        cond = {k: torch.as_tensor(batch[k]).to(like.device) for k in keys}
        if self.cond_dropout > 0 and cond:
            drop = rand((like.shape[0],), self.generator, like) < self.cond_dropout
            null = null_conditioning(cond, self.null_cond)
            cond = {k: torch.where(append_dims(drop, v.ndim), null[k], v) for k, v in cond.items()}
        return cond

    def conditioned_network(self, network: Any, cond: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
        """``network`` as training feeds it: the ``network_wrapper`` (e.g. coordinates), then the concat keys present
        in ``cond`` as channels (:class:`ConcatConditioning`); call it with :meth:`network_keywords`."""
        if self.network_wrapper is not None:
            network = self.network_wrapper(network)
        concat = [k for k in self.concat_keys if k in cond]
        return ConcatConditioning(network, concat) if concat else network

    def network_keywords(self, cond: Mapping[str, Any]) -> dict[str, Any]:
        """The conditioning as keywords of :meth:`conditioned_network` (the context key becomes ``context=``)."""
        return {("context" if k == self.context_key else k): v for k, v in cond.items()}

    def __call__(self, network: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        x0 = batch["image"]
        t = self.schedule.sample_timesteps(x0.shape[0], self.generator, x0.device)
        noise = randn(x0.shape, self.generator, x0)
        x_t = self.schedule.add_noise(x0, noise, t)
        cond = self.conditioning(batch, x0)
        output = self.conditioned_network(network, cond)(x_t, timesteps=t, **self.network_keywords(cond))
        error = output - prediction_target(self.prediction, x0, noise, t, self.schedule)
        per_sample = (error.square() if self.loss == "mse" else error.abs()).flatten(1).mean(1)
        if self.min_snr_gamma is not None:
            per_sample = per_sample * min_snr_weight(self.prediction, t, self.schedule, self.min_snr_gamma).to(per_sample)
        return per_sample

    def __repr__(self) -> str:
        return (f"DiffusionObjective({self.schedule!r}, prediction={self.prediction!r}, "
                f"min_snr_gamma={self.min_snr_gamma}, cond_dropout={self.cond_dropout})")
