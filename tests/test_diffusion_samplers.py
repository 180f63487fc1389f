"""Analytic checks: with Gaussian data N(mu, s^2) per voxel the exact denoiser is known in closed form, and so is the
exact probability-flow ODE solution (an affine map). Every sampler must converge to it / to the right distribution."""

from __future__ import annotations

import pytest
import torch

from meddiff3d.diffusion import (
    SAMPLERS,
    FlowSchedule,
    GaussianDenoiser,
    NoiseSchedule,
    ddim_invert,
    get_sampler,
    make_denoiser,
    prediction_target,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    schedule_from_dict,
    sdedit,
)
from meddiff3d.errors import InputError

MU, STD = 0.5, 0.3


def oracle_network(prediction, schedule, exact):
    """A 'network' trained to perfection under ``prediction``: returns the target implied by the exact denoiser."""

    def net(x, timesteps, **cond):
        x0 = exact(x, timesteps)
        return prediction_target(prediction, x0, exact.eps(x, timesteps), timesteps, schedule)

    return net


def x_T(shape=(4, 1, 8, 8, 8), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def pushforward_error(sampler, schedule, timesteps, denoiser, x):
    exact = GaussianDenoiser(MU, STD, schedule).sample_pushforward(x, timesteps[0])
    return (sampler(denoiser, x, timesteps, schedule) - exact).abs().max().item()


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0", "flow"])
@pytest.mark.parametrize("schedule", [NoiseSchedule(), FlowSchedule()], ids=["vp", "flow"])
def test_adapters_recover_exact_denoiser(prediction, schedule):
    exact = GaussianDenoiser(MU, STD, schedule)
    denoiser = make_denoiser(oracle_network(prediction, schedule, exact), schedule, prediction)
    x, t = x_T((3, 1, 4, 4, 4)), torch.tensor([10.0, 500.0, 990.0])
    torch.testing.assert_close(denoiser(x, t), exact(x, t), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(denoiser.eps(x, t), exact.eps(x, t), atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun"])
@pytest.mark.parametrize("schedule", [NoiseSchedule(), NoiseSchedule("cosine"), FlowSchedule()],
                         ids=["linear", "cosine", "flow"])
def test_deterministic_samplers_converge_to_probability_flow(name, schedule):
    prediction = "flow" if isinstance(schedule, FlowSchedule) else "epsilon"
    exact = GaussianDenoiser(MU, STD, schedule)
    denoiser = make_denoiser(oracle_network(prediction, schedule, exact), schedule, prediction)
    spacing = "log_snr" if isinstance(schedule, NoiseSchedule) else "linspace"
    x = x_T()
    errors = {n: pushforward_error(SAMPLERS[name], schedule, schedule.timesteps(n, spacing), denoiser, x)
              for n in (10, 50, 250)}
    print(name, schedule.to_dict()["type"], {n: f"{e:.1e}" for n, e in errors.items()})
    assert errors[250] < errors[10] / 4
    assert errors[250] < 2e-2  # floor ~5e-4 on VP: the last step jumps from t=0 (b = 0.01) to clean data
    out = SAMPLERS[name](denoiser, x_T((8, 1, 8, 8, 8), seed=1), schedule.timesteps(250, spacing), schedule)
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - STD) < 0.02


def test_dpmpp_2m_20_steps_beats_ddim_50_steps():
    schedule = NoiseSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    denoiser = make_denoiser(oracle_network("epsilon", schedule, exact), schedule, "epsilon")
    x = x_T()
    dpmpp_20 = pushforward_error(sample_dpmpp_2m, schedule, schedule.timesteps(20, "log_snr"), denoiser, x)
    ddim_50 = {s: pushforward_error(sample_ddim, schedule, schedule.timesteps(50, s), denoiser, x)
               for s in ("linspace", "log_snr")}
    dpmpp_20_linspace = pushforward_error(sample_dpmpp_2m, schedule, schedule.timesteps(20, "linspace"), denoiser, x)
    print(f"max |x - exact PF-ODE|: DPM++(2M)-20 log_snr {dpmpp_20:.2e}; DDIM-50 linspace {ddim_50['linspace']:.2e}, "
          f"log_snr {ddim_50['log_snr']:.2e}; (DPM++-20 linspace {dpmpp_20_linspace:.2e})")
    assert dpmpp_20 <= min(ddim_50.values())


def test_flow_heun_20_beats_euler_50():
    schedule = FlowSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    denoiser = make_denoiser(oracle_network("flow", schedule, exact), schedule, "flow")
    x = x_T()
    heun = pushforward_error(SAMPLERS["heun"], schedule, schedule.timesteps(20), denoiser, x)
    euler = pushforward_error(SAMPLERS["euler"], schedule, schedule.timesteps(50), denoiser, x)
    print(f"flow: Heun-20 {heun:.2e}, Euler-50 {euler:.2e}")
    assert heun < euler


@pytest.mark.parametrize("schedule", [NoiseSchedule(), NoiseSchedule("cosine")], ids=["linear", "cosine"])
def test_ddpm_converges_in_distribution(schedule):
    exact = GaussianDenoiser(MU, STD, schedule)
    x = x_T((8, 1, 16, 16, 16))
    stats = {}
    for n in (10, 1000):
        out = sample_ddpm(exact, x, schedule.timesteps(n), schedule, generator=1)
        stats[n] = (out.mean().item(), out.std().item())
    print("ddpm (mean, std):", stats)
    mean, std = stats[1000]
    assert abs(mean - MU) < 0.01 and abs(std - STD) < 0.01  # 32k voxels: sampling error ~2e-3
    assert abs(stats[10][1] - STD) > abs(std - STD)


def test_ddim_eta_one_matches_distribution_and_is_seeded():
    schedule = NoiseSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    x = x_T((8, 1, 16, 16, 16))
    a = sample_ddim(exact, x, schedule.timesteps(1000), schedule, eta=1.0, generator=3)
    b = sample_ddim(exact, x, schedule.timesteps(1000), schedule, eta=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - MU) < 0.01 and abs(a.std().item() - STD) < 0.01


def test_ddim_inversion_round_trip():
    schedule = NoiseSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    x0 = MU + STD * x_T((2, 1, 8, 8, 8), seed=4)
    timesteps = schedule.timesteps(250)
    noise = ddim_invert(exact, x0, timesteps, schedule)
    round_trip = (sample_ddim(exact, noise, timesteps, schedule) - x0).abs().max().item()
    inverse_error = (noise - _exact_inverse(x0, schedule, timesteps[0])).abs().max().item()
    # Fixed-point refinement inverts each discrete DDIM step exactly (to solver precision).
    timesteps = schedule.timesteps(100)
    refined = ddim_invert(exact, x0, timesteps, schedule, fixed_point_iterations=3)
    refined_round_trip = (sample_ddim(exact, refined, timesteps, schedule) - x0).abs().max().item()
    print(f"DDIM inversion: 250 steps |x_T - exact| {inverse_error:.1e}, round trip {round_trip:.1e}; "
          f"100 steps + 3 fixed-point iterations round trip {refined_round_trip:.1e}")
    assert round_trip < 4e-2 and inverse_error < 5e-2  # first order: ~6.5/steps on this data (std 0.3)
    assert refined_round_trip < 1e-4


def _exact_inverse(x0, schedule, t):
    a, b = schedule.scaling(torch.as_tensor(t), x0.ndim)
    return a * MU + (a**2 * STD**2 + b**2).sqrt() * (x0 - MU) / STD


def test_sdedit_partial_noise_keeps_image_close():
    schedule = NoiseSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    x0 = MU + STD * x_T((1, 1, 8, 8, 8), seed=5)
    light = sdedit(exact, x0, schedule.timesteps(50)[48:], schedule, generator=0)  # from t=20: b = 0.06
    heavy = sdedit(exact, x0, schedule.timesteps(50), schedule, generator=0)  # from pure noise
    assert (light - x0).abs().mean() < 0.3 * (heavy - x0).abs().mean()


def test_samplers_work_in_2d_with_callback():
    schedule = NoiseSchedule()
    exact = GaussianDenoiser(MU, STD, schedule)
    for name, sampler in SAMPLERS.items():
        calls = []
        out = sampler(exact, x_T((2, 3, 8, 8)), schedule.timesteps(7), schedule, generator=0,
                      callback=lambda i, t, x, x0: calls.append(i))
        assert out.shape == (2, 3, 8, 8) and calls == list(range(7)), name


def test_get_sampler_names_valid_ones():
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(InputError, match="ddim.*dpmpp_2m"):
        get_sampler("dpm_fast")


def test_schedule_round_trips_and_conversions():
    for schedule in (NoiseSchedule("cosine"), FlowSchedule(shift=3.0)):
        assert schedule_from_dict(schedule.to_dict()) == schedule
    s = NoiseSchedule()
    t = torch.tensor([-1.0, -0.5, 0.0, 12.25, 998.5])
    torch.testing.assert_close(s.alpha_bar_to_t(s.alpha_bar(t)), t.double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.sigma_to_t(s.sigma(t[2:])), t[2:].double(), atol=1e-6, rtol=0)
    torch.testing.assert_close(s.log_snr(t[2:]), -2 * s.sigma(t[2:]).log())
    assert s.timesteps(50, "leading")[0] == 980 and s.timesteps(50, "trailing")[0] == 999
    with pytest.raises(InputError):
        s.timesteps(10, "karras")
