"""Wrappers around denoisers/networks: guidance, conditioning, coordinates, inpainting; and structured noise."""

from __future__ import annotations


import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from meddiff3d.diffusion import (
    AppendCoordinates,
    ClassifierFreeGuidance,
    ConcatConditioning,
    CoordinateChannels,
    DiffusionObjective,
    EpsilonDenoiser,
    GaussianDenoiser,
    Inpainting,
    NoiseSchedule,
    gaussian_noise,
    sample_ddim,
    sample_repaint,
    simplex_noise,
)
from meddiff3d.errors import InputError


def conditioned_unet() -> DiffusionModelUNet:
    """The anchor brain-LDM layout in miniature: 3 latent channels + 4 covariate channels, context of dim 4."""
    torch.manual_seed(0)
    net = DiffusionModelUNet(spatial_dims=3, in_channels=3 + 4, out_channels=3, num_res_blocks=1, channels=(8, 8),
                             attention_levels=(False, True), norm_num_groups=8, num_head_channels=8,
                             with_conditioning=True, cross_attention_dim=4)
    for p in net.parameters():  # MONAI zero-initialises output and attention projections: make them matter
        if p.ndim > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_concat_and_cross_attention_together_with_monai_unet():
    net, schedule = conditioned_unet(), NoiseSchedule()
    denoiser = EpsilonDenoiser(ConcatConditioning(net, "concat"), schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, 8, generator=g)
    covariates, context = torch.rand(2, 4, generator=g), torch.rand(2, 1, 4, generator=g)
    t = torch.tensor([10.0, 900.0])
    out = denoiser(x, t, concat=covariates, context=context)
    assert out.shape == x.shape
    # A covariate vector broadcast as channels equals passing the broadcast volume.
    volume = covariates[:, :, None, None, None].expand(-1, -1, 8, 8, 8)
    torch.testing.assert_close(denoiser(x, t, concat=volume, context=context), out)
    # Both kinds of conditioning reach the network.
    assert not torch.allclose(denoiser(x, t, concat=covariates, context=context * 0), out)
    assert not torch.allclose(denoiser(x, t, concat=covariates * 0, context=context), out)
    # Sampling with guidance, and training through the objective, take the same keys.
    cfg = ClassifierFreeGuidance(denoiser, scale=3.0)
    sample = sample_ddim(cfg, x, schedule.timesteps(3), schedule, cond={"concat": covariates, "context": context})
    assert sample.shape == x.shape and torch.isfinite(sample).all()
    objective = DiffusionObjective(schedule, prediction="v", cond_dropout=0.5)
    loss = objective(net.train(), {"image": x, "concat": covariates, "context": context})
    assert loss.shape == (2,)
    loss.mean().backward()
    with pytest.raises(InputError, match="concat"):
        denoiser(x, t, context=context)


def test_cfg_scale_one_is_conditional_and_batched_combination_is_exact():
    net, schedule = conditioned_unet(), NoiseSchedule()
    denoiser = EpsilonDenoiser(ConcatConditioning(net, "concat"), schedule)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, 8, generator=g), torch.tensor([300.0, 300.0])
    cond = {"concat": torch.rand(2, 4, generator=g), "context": torch.rand(2, 1, 4, generator=g)}
    assert torch.equal(ClassifierFreeGuidance(denoiser, 1.0)(x, t, **cond), denoiser(x, t, **cond))
    learned_null = torch.full((1, 4), 0.5)  # a learned null context embedding, broadcast to the batch
    cfg = ClassifierFreeGuidance(denoiser, 4.0, null_cond={"context": learned_null})
    cond_x0 = denoiser(x, t, **cond)
    uncond_x0 = denoiser(x, t, concat=cond["concat"], context=learned_null.expand(2, 1, 4))
    torch.testing.assert_close(cfg(x, t, **cond), uncond_x0 + 4.0 * (cond_x0 - uncond_x0), atol=1e-5, rtol=1e-5)


def test_coordinate_channels_of_a_patch_are_the_crop_of_the_full_volume():
    coords = CoordinateChannels((16, 12, 10))
    assert coords.num_channels == 3
    full = coords((16, 12, 10))
    assert full.shape == (1, 3, 16, 12, 10)
    assert full[0, 0, 0, 0, 0] == -1 and full[0, 0, -1, 0, 0] == 1 and full[0, 2, 0, 0, -1] == 1
    patch = coords((8, 6, 5), offset=(4, 3, 2))
    torch.testing.assert_close(patch, full[:, :, 4:12, 3:9, 2:7])
    batch = coords((8, 6, 5), offset=torch.tensor([[0, 0, 0], [8, 6, 5]]), batch_size=2)
    torch.testing.assert_close(batch[1:], full[:, :, 8:, 6:, 5:])
    with pytest.raises(InputError):
        coords((8, 6, 5), offset=(9, 0, 0))
    assert CoordinateChannels((32, 32))((8, 8), offset=(8, 24)).shape == (1, 2, 8, 8)  # 2D

    seen = {}

    def net(x, timesteps, **cond):
        seen["x"] = x
        return x[:, :1]

    wrapped = AppendCoordinates(net, coords)
    wrapped(torch.zeros(1, 1, 8, 6, 5), timesteps=torch.zeros(1), patch_offset=(4, 3, 2))
    assert wrapped.num_channels == 3
    torch.testing.assert_close(seen["x"][:, 1:], patch)


@pytest.mark.parametrize("resample", [1, 3])
def test_repaint_keeps_known_region(resample):
    schedule = NoiseSchedule()
    denoiser = GaussianDenoiser(0.5, 0.3, schedule)
    g = torch.Generator().manual_seed(2)
    known = 0.5 + 0.3 * torch.randn(1, 1, 8, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[..., :4] = 1
    x_T = torch.randn(1, 1, 8, 8, 8, generator=g)
    out = sample_repaint(denoiser, x_T, schedule.timesteps(20), schedule, known, mask, resample=resample, generator=0)
    assert torch.equal(out[..., :4], known[..., :4])
    assert not torch.allclose(out[..., 4:], known[..., 4:])
    replaced = sample_ddim(Inpainting(denoiser, known, mask, schedule, generator=0), x_T, schedule.timesteps(20),
                           schedule)
    torch.testing.assert_close(replaced[..., :4], known[..., :4], atol=1e-6, rtol=0)


def test_simplex_noise_seeded_normalised_correlated():
    a = simplex_noise((2, 1, 24, 24, 24), generator=0)
    assert torch.equal(a, simplex_noise((2, 1, 24, 24, 24), generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(a, simplex_noise((2, 1, 24, 24, 24), generator=1))
    assert not torch.allclose(a[0], a[1])  # fields of a batch are independent
    for field in a:
        assert abs(field.mean().item()) < 1e-5 and abs(field.std().item() - 1) < 1e-4

    def neighbour_correlation(n):
        return torch.corrcoef(torch.stack([n[..., 1:].flatten(), n[..., :-1].flatten()]))[0, 1].item()

    assert neighbour_correlation(a) > 0.5
    assert abs(neighbour_correlation(gaussian_noise((2, 1, 24, 24, 24), generator=0))) < 0.1
    assert simplex_noise((1, 2, 16, 16), generator=0).shape == (1, 2, 16, 16)  # 2D: slices of the 3D noise


@pytest.mark.slow
def test_simplex_noise_full_brain_volume():
    """Full 160x224x160 field (its speed is measured by scripts/bench_simplex_noise.py, not asserted here)."""
    noise = simplex_noise((1, 1, 160, 224, 160), generator=0)
    assert noise.shape == (1, 1, 160, 224, 160)
    assert abs(float(noise.mean())) < 1e-3 and abs(float(noise.std()) - 1) < 1e-3
    assert torch.isfinite(noise).all()
