"""DPM-Solver++(3M), UniPC and the ``time_quadratic`` spacing (issue 15 item 3).

Closed form: on Gaussian data (``GaussianDenoiser``, mean 0.5, std 0.3) the error against the exact probability-flow
solution to the last timestep, then ``x0_hat`` there (which leaves out the final jump to clean data, where every
sampler ends on ``x0_hat``), falls by 2^order from N to 2N steps. Measured max |x - exact| at 40 / 80 / 160 log_snr steps, linear betas:
dpmpp_2m 4.0e-3 / 9.8e-4 / 2.4e-4 (x4), dpmpp_3m 2.3e-4 / 1.4e-5 / 9.6e-7 (x15), unipc (order 2: third order)
1.3e-3 / 1.6e-4 / 2.0e-5 (x8), unipc order 3 6.9e-5 / 7.4e-6 / 5.4e-7 (x10-14). k-diffusion's 3M coefficient (half
the exact weight on the second difference) gives x4.

Toy mixture (anchor VP schedule, 2000 samples from fixed noise, exact denoiser), energy distance to 2000 exact
draws: DDIM-200 0.0017, DDIM-16 0.0052; 8 steps at the default spacings: dpmpp_2m 0.0086, dpmpp_3m 0.0041, unipc
0.0019. Mean squared distance to the exact flow: DDIM-50 1.9e-3, unipc-10 6.7e-4, dpmpp_3m-15 1.1e-3.
"""

from __future__ import annotations

import functools

import pytest
import torch
from toy_mixture import data, energy_distance, exact_denoiser

from meddiff3d.diffusion import (
    FLOW_TIMESTEP_SPACING,
    SAMPLERS,
    TIMESTEP_SPACING,
    FlowSchedule,
    GaussianDenoiser,
    NoiseSchedule,
    default_spacing,
    get_sampler,
    sample,
    sample_dpmpp_3m,
    sample_unipc,
)
from meddiff3d.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHOR = NoiseSchedule("scaled_linear_beta", beta_start=0.0015, beta_end=0.0205)
MU, STD = 0.5, 0.3
SOLVERS = {"dpmpp_3m": sample_dpmpp_3m, "unipc": sample_unipc, "unipc_3": functools.partial(sample_unipc, order=3)}


def gaussian_error(sampler, schedule, steps, x):
    exact = GaussianDenoiser(MU, STD, schedule)
    timesteps = schedule.timesteps(steps, "log_snr")
    reference = exact(exact.sample_pushforward(x, timesteps[0], timesteps[-1]), timesteps[-1])
    return (sampler(exact, x, timesteps, schedule) - reference).abs().max().item()


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("schedule", [NoiseSchedule(), NoiseSchedule("cosine"), ANCHOR],
                         ids=["linear", "cosine", "anchor"])
def test_third_order_convergence_on_gaussian_data(name, schedule):
    x = torch.randn((4, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = {n: gaussian_error(SOLVERS[name], schedule, n, x) for n in (40, 80, 160)}
    dpmpp_2m = {n: gaussian_error(SAMPLERS["dpmpp_2m"], schedule, n, x) for n in (40, 80, 160)}
    print(name, schedule.schedule, {n: f"{e:.1e}" for n, e in errors.items()},
          "dpmpp_2m", {n: f"{e:.1e}" for n, e in dpmpp_2m.items()})
    assert errors[80] / errors[160] >= 6  # third order: 8 (second order, e.g. dpmpp_2m: 4)
    assert all(errors[n] < dpmpp_2m[n] for n in errors)


@pytest.fixture(scope="module")
def toy():
    noise = torch.randn((2000, 2, 1), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    denoiser = exact_denoiser(ANCHOR)
    flow = sample_dpmpp_3m(denoiser, noise, ANCHOR.timesteps(100, "log_snr"), ANCHOR)  # the exact flow to ~1e-8
    return noise, denoiser, flow, data(2000, seed=1)


def test_eight_steps_on_the_toy_mixture_near_ddim_200(toy):
    noise, denoiser, _, reference = toy
    quality = {(name, steps): energy_distance(sample(denoiser, noise, ANCHOR, sampler=name, steps=steps), reference)
               for name, steps in [("ddim", 200), ("ddim", 16), ("dpmpp_2m", 8), ("dpmpp_3m", 8), ("unipc", 8)]}
    print({f"{name}-{steps}": round(e, 4) for (name, steps), e in quality.items()})
    assert quality["unipc", 8] < quality["ddim", 200] + 0.001
    assert quality["dpmpp_3m", 8] < quality["ddim", 200] + 0.003
    assert max(quality["unipc", 8], quality["dpmpp_3m", 8]) < min(quality["ddim", 16], quality["dpmpp_2m", 8])


def test_closer_to_the_exact_flow_than_ddim_50(toy):
    noise, denoiser, flow, _ = toy
    distance = {(name, steps): ((sample(denoiser, noise, ANCHOR, sampler=name, steps=steps) - flow) ** 2).sum(1).mean()
                for name, steps in [("ddim", 50), ("unipc", 10), ("dpmpp_3m", 15)]}
    print({f"{name}-{steps}": f"{d:.1e}" for (name, steps), d in distance.items()})
    assert distance["unipc", 10] < distance["ddim", 50] / 2
    assert distance["dpmpp_3m", 15] < distance["ddim", 50]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 1, 4, 6, 4)], ids=["2d", "3d"])
def test_one_denoiser_call_per_timestep_shapes_and_determinism(name, shape):
    exact = GaussianDenoiser(MU, STD, ANCHOR)
    calls, callbacks = [], []

    def counting(x, t, **cond):
        calls.append(float(t[0]))
        return exact(x, t)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    for steps in (1, 2, 3, 8, 25):
        calls.clear(), callbacks.clear()
        timesteps = ANCHOR.timesteps(steps, "time_quadratic")
        out = SOLVERS[name](counting, x, timesteps, ANCHOR, callback=lambda i, t, x, x0: callbacks.append(i))
        assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
        assert callbacks == list(range(steps)) and calls == timesteps.tolist()  # the corrector reuses the next call
        assert torch.equal(out, SOLVERS[name](exact, x, timesteps, ANCHOR))


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc"])
def test_flow_schedule_runs_on_its_own_timesteps(name):
    schedule = FlowSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    x = torch.randn((4, 1, 8, 8, 8), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert default_spacing(name, None, schedule) == FLOW_TIMESTEP_SPACING[name] == "log_snr"
    errors = {}
    for steps in (10, 40):
        timesteps = schedule.timesteps(steps, "log_snr")  # from pure noise (lambda = -inf): first order there
        reference = exact(exact.sample_pushforward(x, timesteps[0], timesteps[-1]), timesteps[-1])
        errors[steps] = (sample(exact, x, schedule, sampler=name, steps=steps) - reference).abs().max().item()
    print(name, "flow", errors)
    assert errors[40] < errors[10] / 8 and errors[40] < 1e-3


def test_time_quadratic_spacing_and_defaults():
    t = ANCHOR.timesteps(5, "time_quadratic")
    torch.testing.assert_close(t, torch.tensor([999.0, 999 * 0.5625, 999 * 0.25, 999 * 0.0625, 0.0]))
    assert ANCHOR.timesteps(1, "time_quadratic").tolist() == [999.0]
    assert TIMESTEP_SPACING["dpmpp_3m"] == TIMESTEP_SPACING["unipc"] == "time_quadratic"
    assert default_spacing("unipc", None, ANCHOR) == "time_quadratic"
    assert default_spacing("unipc", "log_snr") == "log_snr"
    assert default_spacing("ddim", None, FlowSchedule()) == "linspace"
    assert get_sampler("dpmpp_3m") is sample_dpmpp_3m and get_sampler("unipc") is sample_unipc
    with pytest.raises(InputError, match="unipc order must be 1, 2 or 3, got 4"):
        sample_unipc(GaussianDenoiser(MU, STD, ANCHOR), torch.zeros(1, 1, 2, 2), ANCHOR.timesteps(3), ANCHOR, order=4)
