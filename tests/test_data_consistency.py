"""Measurement operators and posterior sampling (meddiff3d.diffusion.measurements, .data_consistency), against closed
forms: numpy's FFT for the k-space convention, dense linear algebra for adjoints and back-projections, and the exact
Gaussian posterior ``N(mu + v A^T (v A A^T + s^2 I)^-1 (y - A mu), v I - v^2 A^T (v A A^T + s^2 I)^-1 A)`` for the
samples drawn with an exact Gaussian prior denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff3d.diffusion import (DataConsistency, Downsample, GaussianDenoiser, KSpaceSampling, MaskOperator,
                                 NoiseSchedule, cartesian_mask, fft2c, ifft2c)
from meddiff3d.diffusion.sampling import sample
from meddiff3d.errors import InputError

pytestmark = pytest.mark.usefixtures("one_thread")


def operators(shape: tuple[int, int]) -> dict[str, object]:
    """One operator of each kind for ``(1, 1, *shape)`` images (an even grid)."""
    g = torch.Generator().manual_seed(3)
    return {
        "mask": MaskOperator((torch.rand((1, 1, *shape), generator=g) < 0.4).float()),
        "downsample": Downsample((2, 2)),
        "kspace": KSpaceSampling(cartesian_mask(shape[1], 3, 0.2, "random", seed=1).float()),
    }


def as_real(y: torch.Tensor) -> torch.Tensor:
    y = y.reshape(-1)
    return torch.cat([y.real, y.imag]) if y.is_complex() else y


def dense(op, shape: tuple[int, int]) -> np.ndarray:
    """The matrix of ``op`` (complex measurements as [real; imaginary] rows) on ``(1, 1, *shape)`` images."""
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, 1, *shape)  # (n, 1, C, *shape)
    return np.stack([as_real(op.forward(e[None])).numpy() for e in basis[:, 0]], axis=1)


def from_real(vector: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(vector)
    if like.is_complex():
        half = v.numel() // 2
        v = torch.complex(v[:half], v[half:])
    return v.reshape(like.shape)


@pytest.mark.parametrize("shape", [(6, 8), (7, 5)])
def test_fft2c_is_numpys_centred_orthonormal_fft(shape):
    x = torch.randn((2, 1, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x.numpy(), axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    k = fft2c(x)
    np.testing.assert_allclose(k.numpy(), ref, atol=1e-12)
    torch.testing.assert_close(ifft2c(k).real, x)
    assert torch.allclose(k.abs().square().sum(), x.square().sum())  # Parseval: orthonormal
    centre = fft2c(torch.ones((1, 1, *shape), dtype=torch.float64))[0, 0]
    assert centre[shape[0] // 2, shape[1] // 2].real == pytest.approx(np.sqrt(np.prod(shape)))  # DC at n // 2
    assert centre.abs().sum() == pytest.approx(np.sqrt(np.prod(shape)))


@pytest.mark.parametrize("acceleration, centre", [(4, 0.08), (8, 0.04)])
def test_cartesian_masks_keep_the_centre_and_reach_the_acceleration(acceleration, centre):
    columns = 320
    low = round(columns * centre)
    start = (columns - low + 1) // 2
    for kind in ("random", "equispaced"):
        masks = torch.stack([cartesian_mask(columns, acceleration, centre, kind, seed=s) for s in range(50)])
        assert masks[:, start:start + low].all(), kind  # the fully sampled centre
        assert masks.float().mean().item() == pytest.approx(1 / acceleration, rel=0.1), kind
        assert torch.equal(masks[0], cartesian_mask(columns, acceleration, centre, kind, seed=0))
        assert not torch.equal(masks[0], masks[1]), kind  # the seed draws the lines
    spacing = acceleration * (columns - low) / (columns - low * acceleration)  # fastMRI's equispaced lines
    lines = torch.nonzero(cartesian_mask(columns, acceleration, centre, "equispaced", seed=0)).ravel()
    for side in (lines[lines < start], lines[lines >= start + low]):
        assert set(torch.diff(side).tolist()) <= {int(np.floor(spacing)), int(np.ceil(spacing))}, (spacing, side)


@pytest.mark.parametrize("kwargs, match", [
    ({"columns": 1}, "at least 2 columns"), ({"acceleration": 0.5}, "acceleration"),
    ({"center_fraction": 0.25}, "center_fraction"), ({"kind": "radial"}, "unknown k-space mask kind 'radial'"),
])
def test_cartesian_mask_refuses_bad_settings(kwargs, match):
    settings = {"columns": 64, "acceleration": 4, "center_fraction": 0.08, **kwargs}
    with pytest.raises(InputError, match=match):
        cartesian_mask(**settings)


@pytest.mark.parametrize("name", ["mask", "downsample", "kspace"])
def test_adjoint_and_back_projection_match_dense_linear_algebra(name):
    shape = (6, 8)
    op = operators(shape)[name]
    a = dense(op, shape)
    g = torch.Generator().manual_seed(5)
    x = torch.randn((1, 1, *shape), generator=g, dtype=torch.float64)
    y = op.forward(torch.randn((1, 1, *shape), generator=g, dtype=torch.float64))  # a measurement of another image
    np.testing.assert_allclose(as_real(op.forward(x)).numpy(), a @ x.numpy().ravel(), atol=1e-12)
    np.testing.assert_allclose(op.adjoint(y).numpy().ravel(), a.T @ as_real(y).numpy(), atol=1e-12)
    for noise_var, prior_var in ((0.0, 1.0), (0.05, 0.3)):
        gram = noise_var * np.eye(a.shape[0]) + prior_var * a @ a.T
        expected = a.T @ np.linalg.pinv(gram, rcond=1e-10, hermitian=True) @ as_real(y).numpy()
        got = op.back_project(y, noise_var, prior_var)
        np.testing.assert_allclose(got.numpy().ravel(), expected, atol=1e-10)
    projected = x + op.back_project(y - op.forward(x), 0.0, 1.0)  # the pseudo-inverse: onto {A x = y}
    torch.testing.assert_close(op.forward(projected), y)


@pytest.mark.parametrize("name, noise_std", [("mask", 0.0), ("downsample", 0.1), ("kspace", 0.0), ("kspace", 0.1)])
def test_posterior_samples_of_a_gaussian_prior_have_the_closed_form_mean_and_variance(name, noise_std):
    """Data N(mu, v) per pixel (mu an image); the exact prior denoiser wrapped by DataConsistency and sampled with
    DPM-Solver++(2M) (deterministic; second order: DDIM at 200 steps still draws the prior's variance 3 % low) gives
    the exact posterior's mean and per-pixel variance."""
    shape, v, n = (6, 8), 0.25, 4000
    op = operators(shape)[name]
    g = torch.Generator().manual_seed(11)
    mu = torch.linspace(-0.5, 0.5, int(np.prod(shape)), dtype=torch.float64).reshape(1, 1, *shape)
    truth = mu + v**0.5 * torch.randn(mu.shape, generator=g, dtype=torch.float64)
    y = op.forward(truth)
    if noise_std:
        parts = [torch.randn(y.shape, generator=g, dtype=torch.float64) for _ in range(1 + y.is_complex())]
        y = y + noise_std * (torch.complex(*parts) if y.is_complex() else parts[0])
    schedule = NoiseSchedule()
    posterior = DataConsistency(GaussianDenoiser(mu, v**0.5, schedule), op, y, schedule, noise_std=noise_std,
                                prior_variance=v)
    noise = torch.randn((n, 1, *shape), generator=g, dtype=torch.float64)
    samples = sample(posterior, noise, schedule, sampler="dpmpp_2m", steps=100).reshape(n, -1).numpy()

    a = dense(op, shape)
    gain = v * a.T @ np.linalg.pinv(v * a @ a.T + noise_std**2 * np.eye(a.shape[0]), rcond=1e-10, hermitian=True)
    mean = mu.numpy().ravel() + gain @ (as_real(y).numpy() - a @ mu.numpy().ravel())
    variance = np.diag(v * np.eye(a.shape[1]) - gain @ a * v)
    assert np.abs(samples.mean(0) - mean).max() < 4 * np.sqrt(v / n) + 2e-3
    np.testing.assert_allclose(samples.var(0), variance, atol=0.02)
    assert variance.mean() < 0.8 * v  # the measurement informs it: not the prior's answer


# ------------------------------------------------------------------------------------------------ classical baselines
def phantom(size: int = 32) -> torch.Tensor:
    """A piecewise-constant image: two rectangles and a disk on a background, ``(1, 1, size, size)``."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = torch.full((size, size), 0.1, dtype=torch.float64)
    x[4:14, 5:27] = 0.6
    x[18:28, 8:14] = 0.9
    x[((rows - 22) ** 2 + (cols - 22) ** 2) < 25] = 0.4
    return x[None, None]


def test_gradient_and_divergence_are_negative_adjoints():
    from meddiff3d.pipelines.inverse_problems import _divergence, _gradient

    g = torch.Generator().manual_seed(0)
    for shape in ((2, 1, 7, 9), (1, 2, 5, 4, 6)):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        q = torch.randn((shape[0], len(shape) - 2, *shape[1:]), generator=g, dtype=torch.float64)
        assert torch.allclose((_gradient(x) * q).sum(), -(x * _divergence(q)).sum())


def test_tv_reconstruction_beats_zero_filling_and_trades_data_for_smoothness():
    from meddiff3d.pipelines.inverse_problems import _gradient, nmse, tv_reconstruction, zero_filled

    x = phantom()
    op = KSpaceSampling(cartesian_mask(32, 4, 0.125, "random", seed=0).double())
    y = op.forward(x)
    zf = zero_filled(op, y)
    tv = tv_reconstruction(op, y, 0.002, iterations=500)
    assert nmse(tv, x) < 0.5 * nmse(zf, x), (nmse(tv, x), nmse(zf, x))
    torch.testing.assert_close(op.forward(tv), y, atol=0.02, rtol=0)  # close to the data
    total_variation, residual = [], []
    for lam in (0.0005, 0.005, 0.05):  # a heavier weight: a smoother image, further from the data
        estimate = tv_reconstruction(op, y, lam, iterations=300)
        total_variation.append(float(_gradient(estimate).norm(dim=1).sum()))
        residual.append(float((op.forward(estimate) - y).abs().square().sum()))
    assert total_variation == sorted(total_variation, reverse=True) and residual == sorted(residual), (
        total_variation, residual)
    down = Downsample((2, 2))
    coarse = tv_reconstruction(down, down.forward(x), 0.002, iterations=500, operator_norm=0.5)
    assert nmse(coarse, x) < nmse(zero_filled(down, down.forward(x)), x)


def test_interpolation_baselines_reproduce_smooth_images():
    from meddiff3d.pipelines.inverse_problems import interpolate

    rows, cols = torch.meshgrid(torch.linspace(0, 1, 32, dtype=torch.float64),
                                torch.linspace(0, 1, 32, dtype=torch.float64), indexing="ij")
    x = (torch.sin(2 * rows) * torch.cos(3 * cols))[None, None]
    low = Downsample((2, 2)).forward(x)
    for method in ("bicubic", "bspline"):
        up = interpolate(low, (2, 2), method)
        assert up.shape == x.shape and (up - x).abs()[..., 2:-2, 2:-2].max() < 0.02, method
    with pytest.raises(InputError, match="unknown interpolation 'lanczos'"):
        interpolate(low, (2, 2), "lanczos")
