"""The training objective: the interface the engine calls, ``objective(network, batch) -> (B,)``."""

from __future__ import annotations

import pytest
import torch

from meddiff3d.diffusion import (
    DiffusionObjective,
    FlowSchedule,
    NoiseSchedule,
    min_snr_weight,
    prediction_target,
)
from meddiff3d.errors import InputError


class OracleNetwork:
    """Knows the clean batch, so it can return the exact target: recovers the noise from ``x_t`` and ``t``."""

    def __init__(self, x0, schedule, prediction):
        self.x0, self.schedule, self.prediction = x0, schedule, prediction

    def __call__(self, x, timesteps, context=None):
        x_t = x[:, : self.x0.shape[1]]  # concatenated conditioning channels come after the image channels
        a, b = self.schedule.scaling(timesteps, x.ndim)
        noise = ((x_t - a * self.x0) / b).to(x.dtype)
        return prediction_target(self.prediction, self.x0, noise, timesteps, self.schedule)


def batch(b=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(b, 2, 4, 4, 4, generator=g, dtype=dtype),
            "concat": torch.randn(b, 3, generator=g, dtype=dtype),
            "context": torch.randn(b, 1, 4, generator=g, dtype=dtype),
            "image_meta_dict": {"filename": ["a"] * b}}


@pytest.mark.parametrize("prediction,schedule", [("epsilon", NoiseSchedule()), ("v", NoiseSchedule("cosine")),
                                                 ("x0", NoiseSchedule()), ("flow", FlowSchedule())])
def test_oracle_network_has_zero_loss(prediction, schedule):
    data = batch()
    objective = DiffusionObjective(schedule, prediction=prediction, min_snr_gamma=5.0, cond_dropout=0.3)
    loss = objective(OracleNetwork(data["image"], schedule, prediction), data)
    assert loss.shape == (4,)
    assert loss.max() < 1e-12
    zero_net = lambda x, timesteps, context=None: torch.zeros_like(x[:, :2])  # noqa: E731
    assert (DiffusionObjective(schedule, prediction=prediction)(zero_net, data) > 0).all()


def test_network_receives_concat_channels_and_context():
    seen = {}

    def net(x, timesteps, context=None):
        seen.update(x=x, t=timesteps, context=context)
        return x[:, :2]

    data = batch()
    DiffusionObjective(NoiseSchedule())(net, data)
    assert seen["x"].shape == (4, 2 + 3, 4, 4, 4) and seen["t"].shape == (4,) and seen["t"].is_floating_point()
    torch.testing.assert_close(seen["x"][:, 2:, 1, 2, 3], data["concat"])
    assert torch.equal(seen["context"], data["context"])


def test_cond_dropout_rate_and_null_condition():
    seen = {}

    def net(x, timesteps, context=None):
        seen.update(x=x, context=context)
        return x[:, :1]

    n, p = 4000, 0.3
    data = {"image": torch.zeros(n, 1, 2, 2, 2), "concat": torch.ones(n, 2), "context": torch.ones(n, 1, 4)}
    DiffusionObjective(NoiseSchedule(), cond_dropout=p, generator=torch.Generator().manual_seed(0))(net, data)
    dropped_context = (seen["context"] == 0).all(dim=(1, 2))
    dropped_concat = (seen["x"][:, 1:] == 0).flatten(1).all(dim=1)
    assert torch.equal(dropped_context, dropped_concat)  # a sample loses all of its conditioning at once
    assert abs(dropped_context.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5

    null = torch.full((1, 4), -1.0)  # a learned null context; the concat channels are kept
    DiffusionObjective(NoiseSchedule(), cond_dropout=1.0, null_cond={"context": null})(net, data)
    assert (seen["context"] == -1).all() and (seen["x"][:, 1:] == 1).all()


def test_min_snr_weights_match_the_paper():
    schedule, gamma = NoiseSchedule(), 5.0
    t = torch.tensor([0.0, 50.0, 200.0, 999.0])
    snr = schedule.alpha_bar(t) / (1 - schedule.alpha_bar(t))
    torch.testing.assert_close(min_snr_weight("epsilon", t, schedule, gamma), snr.clamp(max=gamma) / snr)
    torch.testing.assert_close(min_snr_weight("v", t, schedule, gamma), snr.clamp(max=gamma) / (snr + 1))
    torch.testing.assert_close(min_snr_weight("x0", t, schedule, gamma), snr.clamp(max=gamma))

    zero_net = lambda x, timesteps, context=None: torch.zeros_like(x)  # noqa: E731
    data = {"image": batch()["image"]}
    plain = DiffusionObjective(schedule, "v", generator=torch.Generator().manual_seed(1))(zero_net, data)
    weighted = DiffusionObjective(schedule, "v", min_snr_gamma=gamma,
                                  generator=torch.Generator().manual_seed(1))(zero_net, data)
    t_drawn = schedule.sample_timesteps(4, torch.Generator().manual_seed(1))
    torch.testing.assert_close(weighted, plain * min_snr_weight("v", t_drawn, schedule, gamma))


def test_global_rng_is_used_without_generator():
    objective = DiffusionObjective(NoiseSchedule(), cond_dropout=0.5)
    net = lambda x, timesteps, context=None: x[:, :2] * 0.5  # noqa: E731
    torch.manual_seed(7)
    first = objective(net, batch())
    torch.manual_seed(7)
    assert torch.equal(objective(net, batch()), first)
    assert not torch.equal(objective(net, batch()), first)


def test_bad_arguments_raise_input_error():
    with pytest.raises(InputError, match="epsilon"):
        DiffusionObjective(NoiseSchedule(), prediction="eps")
    with pytest.raises(InputError):
        DiffusionObjective(NoiseSchedule(), cond_dropout=1.5)
