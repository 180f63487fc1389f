"""Solving ``y = A(x) + noise`` for an image: with an image diffusion prior, and the classical baselines beside it.

* :func:`diffusion_reconstruction` -- posterior sampling with a trained image diffusion model (its network and
  :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer`: :class:`~meddiff3d.diffusion.DataConsistency` around
  its denoiser). The measurement is mapped into the model's
  intensity range by an affine window ``(low, high)`` (``A`` is linear: ``A(s x + c) = s A(x) + c A(1)``), by default
  the percentile window of the pseudo-inverse image ``A^+ y``; ``num_samples > 1`` averages posterior samples (the
  posterior mean, the MMSE estimate) and returns their per-pixel standard deviation.
* :func:`zero_filled` -- fastMRI's zero-filled baseline for k-space, ``|ifft2c(y)|`` (unsampled frequencies zero);
  ``A^+ y`` for the other operators (block-constant upsampling, the masked image). The pseudo-inverse ``A^+ y`` of
  k-space also fills each frequency sampled without its mirror from the mirror's conjugate (a real image's Hermitian
  symmetry), so it is a little better than zero filling; it sets the default intensity window.
* :func:`tv_reconstruction` -- ``argmin_x 1/2 ||A x - y||^2 + lam TV(x)`` (isotropic total variation, the classical
  compressed-sensing reconstruction) by the primal-dual algorithm of Chambolle & Pock (2011), on the same operators.
  Written here rather than taken from a library: the MRI CS packages (e.g. SigPy's ``TotalVariationRecon``) bring their
  own operator and FFT conventions (and numba), and the algorithm is 20 lines on the operators the diffusion
  reconstruction uses, so both solve exactly the same problem.
* :func:`interpolate` -- bicubic and cubic B-spline upsampling of a low-resolution image, the super-resolution
  baselines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from meddiff3d.checks import check_int, check_number
from meddiff3d.diffusion import KSpaceSampling, ifft2c
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import MODEL_RANGE, class_labels, from_model_range, to_model_range, window
from meddiff3d.pipelines.inferers import ImageDiffusionInferer

__all__ = ["zero_filled", "tv_reconstruction", "interpolate", "diffusion_reconstruction", "nmse", "INTERPOLATIONS"]

INTERPOLATIONS = ("bicubic", "bspline")


def zero_filled(operator: Any, y: torch.Tensor) -> torch.Tensor:
    """The reconstruction that assumes nothing about the image (module docstring)."""
    if isinstance(operator, KSpaceSampling):
        return ifft2c(y).abs()
    return operator.back_project(y, 0.0, 1.0)


def _gradient(x: torch.Tensor) -> torch.Tensor:
    """Forward differences over the spatial axes (zero at the far edge), stacked on a new axis 1."""
    out = []
    for axis in range(2, x.ndim):
        d = torch.diff(x, dim=axis)
        out.append(torch.cat([d, torch.zeros_like(x.narrow(axis, 0, 1))], dim=axis))
    return torch.stack(out, 1)


def _divergence(q: torch.Tensor) -> torch.Tensor:
    """The negative adjoint of :func:`_gradient`."""
    total = 0
    for i, axis in enumerate(range(2, q.ndim - 1)):
        p = q[:, i]
        n = p.shape[axis]
        first = p.narrow(axis, 0, 1)
        middle = p.narrow(axis, 1, n - 2) - p.narrow(axis, 0, n - 2)
        last = -p.narrow(axis, n - 2, 1)
        total = total + torch.cat([first, middle, last], dim=axis)
    return total


def tv_reconstruction(operator: Any, y: torch.Tensor, lam: float, *, iterations: int = 300,
                      operator_norm: float = 1.0) -> torch.Tensor:
    """``argmin_x 1/2 ||A x - y||^2 + lam sum |grad x|`` (module docstring), from ``A^+ y``.

    ``operator_norm`` bounds ``||A||`` (1 for the masks and k-space sampling of :mod:`meddiff3d.diffusion.measurements`,
    ``prod(factors) ** -0.5`` for block means); the steps ``tau = sigma = 1 / L``, ``L^2 = ||A||^2 + 4 d``, satisfy
    the algorithm's condition ``tau sigma L^2 <= 1``.
    """
    lam = check_number("lam", lam, 0)
    iterations = check_int("iterations", iterations, 1, 100_000)
    x = zero_filled(operator, y)
    dims = x.ndim - 2
    step = 1.0 / math.sqrt(operator_norm**2 + 4 * dims)
    p = torch.zeros_like(y)
    q = torch.zeros((x.shape[0], dims, *x.shape[1:]), dtype=x.dtype, device=x.device)
    x_bar = x.clone()
    for _ in range(iterations):
        p = (p + step * (operator.forward(x_bar) - y)) / (1 + step)  # prox of the data term's conjugate
        q = q + step * _gradient(x_bar)
        q = q / torch.clamp(q.norm(dim=1, keepdim=True) / lam, min=1.0) if lam > 0 else torch.zeros_like(q)
        x_new = x - step * (operator.adjoint(p) - _divergence(q))
        x_bar = 2 * x_new - x
        x = x_new
    return x


def interpolate(low_res: torch.Tensor, factors: Sequence[int], method: str = "bicubic") -> torch.Tensor:
    """``low_res`` ``(B, C, h, w)`` upsampled by ``factors`` with ``"bicubic"`` (torch) or ``"bspline"`` (cubic
    B-spline, scipy), pixel edges aligned as the block means of :class:`~meddiff3d.diffusion.Downsample`."""
    if method not in INTERPOLATIONS:
        raise InputError(f"unknown interpolation {method!r}; valid: {list(INTERPOLATIONS)}")
    size = [s * int(f) for s, f in zip(low_res.shape[2:], factors)]
    if method == "bicubic":
        return F.interpolate(low_res, size=size, mode="bicubic", align_corners=False)
    from scipy import ndimage

    zoom = [1, 1, *[int(f) for f in factors]]
    return torch.from_numpy(ndimage.zoom(low_res.double().cpu().numpy(), zoom, order=3, mode="mirror",
                                         grid_mode=True)).to(low_res)


def nmse(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """Normalised mean squared error ``||x_hat - x||^2 / ||x||^2`` (fastMRI's NMSE)."""
    return float((x_hat.double() - x.double()).square().sum() / x.double().square().sum())


def diffusion_reconstruction(network: torch.nn.Module, inferer: ImageDiffusionInferer, operator: Any, y: torch.Tensor,
                             *, window_: tuple[float, float] | None = None, nonnegative: bool = False,
                             noise_std: float = 0.0,
                             num_samples: int = 1, seed: int = 0, class_name: str | None = None,
                             prior_variance: float = 0.35) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(estimate, per-pixel standard deviation or None)`` of the image behind one measurement ``y`` (a batch of
    1), in ``y``'s intensity units (module docstring).

    Args:
        network: the image diffusion model's network (on its device; readied for autocast or float32).
        inferer: its :class:`~meddiff3d.pipelines.inferers.ImageDiffusionInferer` (meta, sampler, steps, guidance).
        window_: the intensities mapped to the model's [-1, 1]; default: the
            :func:`~meddiff3d.models.image_diffusion.window` of ``A^+ y`` (clipped at 0 with ``nonnegative``).
        nonnegative: the image is known to be non-negative (a magnitude MR image): the aliasing of an undersampled
            pseudo-inverse swings below 0 (0.5th percentile -0.15 to -0.22 of the full scale at 8x on the demo's test
            slices, where the image's own is 0), and a window starting there shows the prior a grey background.
        noise_std: the measurement noise, in ``y``'s units (0: data consistency is exact, and the estimate is
            projected onto ``A x = y`` once more at the end: UniPC's last corrector step moves off it).
        num_samples: posterior samples averaged (sample ``i`` from noise seeded ``seed + i``).
        prior_variance: the variance per pixel of the model's training images in its range (about 0.35 for
            windowed MRI slices: only the balance with measurement noise depends on it).
    """
    num_samples = check_int("num_samples", num_samples, 1, 1000)
    noise_std = check_number("noise_std", noise_std, 0)
    meta = inferer.meta
    y = y.to(torch.complex64 if y.is_complex() else torch.float32)
    pseudo = operator.back_project(y, 0.0, 1.0)  # A^+ y
    if list(pseudo.shape[2:]) != list(meta["image"]["shape"]):
        raise InputError(f"measured image size {list(pseudo.shape[2:])} differs from the model's "
                         f"{meta['image']['shape']}")
    low, high = window_ or window(pseudo.clamp(min=0) if nonnegative else pseudo)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise InputError(f"intensity window must be two finite numbers low < high, got {window_}")
    scale = (MODEL_RANGE[1] - MODEL_RANGE[0]) / (high - low)
    offset = to_model_range(torch.zeros_like(pseudo), low, high)
    y_model = scale * y + operator.forward(offset)  # A(s x + c) = s A(x) + A(c)
    device = next(network.parameters()).device
    noise = inferer.initial_noise(list(range(seed, seed + num_samples)), device)
    labels = class_labels([class_name] * num_samples, meta["classes"]) if meta.get("classes") else None
    x = inferer.posterior(noise, network, operator, y_model, noise_std=noise_std * scale,
                          prior_variance=prior_variance, class_labels=labels, generator=seed)
    x = from_model_range(x.float(), low, high).to(pseudo.device)
    if noise_std == 0:
        x = x + operator.back_project(y - operator.forward(x), 0.0, 1.0)
    return x.mean(0, keepdim=True), (x.std(0, keepdim=True) if num_samples > 1 else None)
