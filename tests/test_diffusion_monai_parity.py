"""Parity with MONAI's schedulers and a tiny MONAI DiffusionModelUNet (3D, random weights, fp32)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from meddiff3d.diffusion import EpsilonDenoiser, GaussianDenoiser, NoiseSchedule, VDenoiser, sample_ddim, sample_ddpm
from meddiff3d.diffusion.samplers import step_pairs

SCHEDULES = [
    ("linear_beta", {}),
    ("scaled_linear_beta", {"beta_start": 0.0015, "beta_end": 0.0205}),
    ("cosine", {}),
]


def tiny_unet(in_channels: int = 1, **kwargs) -> DiffusionModelUNet:
    torch.manual_seed(0)
    net = DiffusionModelUNet(spatial_dims=3, in_channels=in_channels, out_channels=1, num_res_blocks=1,
                             channels=(8, 8), attention_levels=(False, False), norm_num_groups=8, **kwargs)
    for p in net.out.parameters():  # MONAI zero-initialises the output conv; make the network's output non-trivial
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


class DenoisingUNet(torch.nn.Module):
    """A random tiny U-Net on top of the exact noise prediction of N(0, 0.5^2) data, so samples stay O(1) and an
    absolute fp32 tolerance is meaningful (a bare random net drives x0_hat = x / sqrt(ab) to ~1e2)."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.unet, self.exact = tiny_unet(), GaussianDenoiser(0.0, 0.5, schedule)

    def forward(self, x, timesteps, context=None):
        return self.exact.eps(x, timesteps) + 0.1 * self.unet(x, timesteps=timesteps, context=context)


@pytest.mark.parametrize("name,kwargs", SCHEDULES)
def test_schedule_equals_monai(name, kwargs):
    ours, monai = NoiseSchedule(name, **kwargs), DDPMScheduler(1000, schedule=name, **kwargs)
    assert torch.equal(ours.alphas_cumprod.float(), monai.alphas_cumprod)
    assert torch.equal(ours.betas.float(), monai.betas)
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(ours.alpha_bar(t), ours.alphas_cumprod)


@pytest.mark.parametrize("name,kwargs", SCHEDULES)
def test_add_noise_and_velocity_equal_monai(name, kwargs):
    ours, monai = NoiseSchedule(name, **kwargs), DDPMScheduler(1000, schedule=name, **kwargs)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 2, 6, 6, 6, generator=g), torch.randn(3, 2, 6, 6, 6, generator=g)
    t = torch.tensor([0, 517, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), monai.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.velocity(x0, noise, t), monai.get_velocity(x0, noise, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_linspace_equal_monai_ddim(steps_offset):
    monai = DDIMScheduler(1000, steps_offset=steps_offset)
    monai.set_timesteps(50)
    assert torch.equal(NoiseSchedule().timesteps(50, "linspace", steps_offset), monai.timesteps)


def monai_ddim_loop(net, x, scheduler, eta=0.0, generator=None):
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = net(x, timesteps=torch.Tensor((t,)).to(x.device))
        x, _ = scheduler.step(out, t, x, eta=eta, generator=generator)
    return x


@pytest.mark.parametrize("prediction_type,adapter", [("epsilon", EpsilonDenoiser), ("v_prediction", VDenoiser)])
def test_ddim_50_steps_equals_monai_ddim_loop(prediction_type, adapter):
    net = DenoisingUNet(NoiseSchedule()).eval()
    x_T = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    scheduler = DDIMScheduler(1000, clip_sample=False, prediction_type=prediction_type)
    scheduler.set_timesteps(50)
    expected = monai_ddim_loop(net, x_T, scheduler)

    schedule = NoiseSchedule()
    timesteps = schedule.timesteps(50, "linspace")
    # MONAI's step lands on t - T // n, not on the next (linspace) timestep: reproduce it exactly.
    ours = sample_ddim(adapter(net, schedule), x_T, timesteps, schedule, prev_timesteps=timesteps - 1000 // 50)
    print(f"DDIM-50 vs MONAI DDIMScheduler ({prediction_type}): max |diff| = {(ours - expected).abs().max():.2e}")
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    # And the chained default differs only by that one-timestep mismatch.
    chained = sample_ddim(adapter(net, schedule), x_T, timesteps, schedule)
    assert (chained - expected).abs().max() < 0.1


def test_ddim_eta_and_leading_spacing_equal_monai():
    net = DenoisingUNet(NoiseSchedule()).eval()
    x_T = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = DDIMScheduler(1000, clip_sample=False)
    scheduler.set_timesteps(20)
    schedule = NoiseSchedule()
    scheduler.timesteps = schedule.timesteps(20, "leading")  # monai-generative's spacing: a consistent chain
    expected = monai_ddim_loop(net, x_T, scheduler, eta=0.5, generator=torch.Generator().manual_seed(4))
    ours = sample_ddim(EpsilonDenoiser(net, schedule), x_T, schedule.timesteps(20, "leading"), schedule, eta=0.5,
                       generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_ddpm_full_chain_equals_monai_ddpm_loop():
    T = 20  # a short schedule keeps the full ancestral chain cheap
    schedule = NoiseSchedule(num_train_timesteps=T, beta_start=1e-3, beta_end=0.2)
    net = DenoisingUNet(schedule).eval()
    scheduler = DDPMScheduler(T, clip_sample=False, beta_start=1e-3, beta_end=0.2)
    scheduler.set_timesteps(T)
    x_T = torch.randn(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(5))
    g, x = torch.Generator().manual_seed(6), x_T
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = net(x, timesteps=torch.Tensor((t,)))
        x, _ = scheduler.step(out, t, x, generator=g)
    ours = sample_ddpm(EpsilonDenoiser(net, schedule), x_T, schedule.timesteps(T), schedule, generator=6)
    # Same random draws; MONAI forms its posterior coefficients in fp32 (ours in fp64): ~2e-5 after 20 noisy steps.
    torch.testing.assert_close(ours, x, atol=5e-5, rtol=0)


def test_step_pairs_land_on_clean():
    pairs = list(step_pairs([999, 500, 0]))
    assert [p[1] for p in pairs[:-1]] == [500, 0] and pairs[-1][1] is None
