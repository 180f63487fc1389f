"""meddiff3d.engine.reconstruction_metrics: in-brain PSNR/SSIM against closed-form answers, and what the
whole-volume figures hide."""

import math

import pytest
import torch

from meddiff3d.engine.reconstruction_metrics import masked_psnr, masked_ssim, reconstruction_scores


def brain_volume(shape=(40, 48, 40)):
    """A [0, 1] 'brain' (a textured ball) in a zero background, as a skull-stripped normalised volume."""
    g = torch.Generator().manual_seed(0)
    grids = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in shape], indexing="ij")
    ball = sum(c**2 for c in grids) < 0.6
    x = (0.5 + 0.3 * torch.rand(shape, generator=g)) * ball
    return x[None, None], ball[None, None]


def test_psnr_inside_the_brain_is_the_closed_form_and_ignores_the_background():
    x, mask = brain_volume()
    x_hat = x + 0.1 * mask  # error 0.1 inside: MSE 0.01 -> 20 dB
    assert masked_psnr(x_hat, x, mask) == pytest.approx(20.0, abs=1e-4)
    noisy_background = x_hat + 0.05 * (~mask)
    assert masked_psnr(noisy_background, x, mask) == pytest.approx(20.0, abs=1e-4)
    scores = reconstruction_scores(x_hat, x)  # default mask: x > 0, the ball
    assert scores["psnr_brain"] == pytest.approx(20.0, abs=1e-4)
    fraction = float(mask.float().mean())
    assert scores["psnr"] == pytest.approx(20.0 - 10 * math.log10(fraction), abs=0.05)  # the background's share
    assert scores["brain_fraction"] == pytest.approx(fraction)
    assert math.isnan(masked_psnr(x, x, torch.zeros_like(mask))) and masked_psnr(x, x, mask) == math.inf


def test_ssim_inside_the_brain_is_one_for_an_exact_copy_and_blind_to_negative_background():
    x, mask = brain_volume()
    assert masked_ssim(x, x, mask) == pytest.approx(1.0, abs=1e-5)
    shifted_background = x - 0.02 * (~mask)  # a decoder's slight negative background, clipped away
    assert masked_ssim(shifted_background, x, mask) == pytest.approx(1.0, abs=1e-5)
    blurred = torch.nn.functional.avg_pool3d(x, 3, stride=1, padding=1)
    assert 0.0 < masked_ssim(blurred, x, mask) < 0.95
    assert math.isnan(masked_ssim(x, x, torch.zeros_like(mask)))
