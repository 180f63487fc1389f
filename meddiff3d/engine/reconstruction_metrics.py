"""Reconstruction quality inside the brain: PSNR and SSIM over a mask, beside the whole-volume figures.

A skull-stripped 160x224x160 volume is about three quarters background, which an autoencoder reproduces almost
exactly, so whole-volume PSNR and SSIM mostly score the background (the demo autoencoder: 25.7 dB over the volume,
~21 dB inside the brain). The headline figures are therefore taken over the brain:

``psnr_brain``
    ``10 log10(data_range^2 / MSE)`` with the MSE over the mask voxels (``x > 0`` of the reference by default: the
    brain of a skull-stripped, [0, 1]-normalised input).
``ssim_brain``
    MONAI's SSIM map (:func:`monai.metrics.regression.compute_ssim_and_cs`, the defaults of ``SSIMMetric``: an 11^3
    Gaussian window of sigma 1.5, k1 0.01, k2 0.03, computed where the window fits) averaged over the mask voxels
    the map covers. Both volumes are clipped to [0, data_range] first, so a decoder's slight negative values in the
    background cannot move the score.

``psnr`` and ``ssim`` are the whole-volume values (MONAI ``PSNRMetric`` / ``SSIMMetric``, unclipped), kept for
comparison with published figures.
"""

from __future__ import annotations

import math

import torch

__all__ = ["masked_psnr", "masked_ssim", "reconstruction_scores"]

SSIM_KERNEL, SSIM_SIGMA = 11, 1.5


def masked_psnr(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR (dB) over the voxels of ``mask`` (NaN for an empty mask, inf for an exact reconstruction)."""
    if not bool(mask.any()):
        return math.nan
    mse = float(((x_hat.float() - x.float())[mask] ** 2).mean())
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def masked_ssim(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean of the SSIM map over ``mask`` (``(B, C, *spatial)`` tensors; module docstring). NaN if the mask lies
    entirely outside the region the window covers."""
    from monai.metrics.regression import compute_ssim_and_cs

    dims = x.ndim - 2
    pred, ref = (v.float().clamp(0.0, data_range) for v in (x_hat, x))
    ssim_map, _ = compute_ssim_and_cs(pred, ref, dims, [SSIM_KERNEL] * dims, [SSIM_SIGMA] * dims, data_range)
    crop = SSIM_KERNEL // 2
    inner = mask[(Ellipsis, *[slice(crop, s - crop) for s in mask.shape[2:]])]
    if not bool(inner.any()):
        return math.nan
    return float(ssim_map[inner].mean())


def reconstruction_scores(x_hat: torch.Tensor, x: torch.Tensor, data_range: float = 1.0,
                          mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"psnr_brain", "ssim_brain", "psnr", "ssim", "brain_fraction"}`` of one ``(1, C, *spatial)`` pair; the mask
    defaults to ``x > 0`` (module docstring)."""
    from monai.metrics import PSNRMetric, SSIMMetric

    mask = x > 0 if mask is None else mask.bool()
    x_hat = x_hat.to(x.dtype)
    return {"psnr_brain": masked_psnr(x_hat, x, mask, data_range),
            "ssim_brain": masked_ssim(x_hat, x, mask, data_range),
            "psnr": float(PSNRMetric(max_val=data_range)(x_hat, x).mean()),
            "ssim": float(SSIMMetric(spatial_dims=x.ndim - 2, data_range=data_range)(x_hat, x).mean()),
            "brain_fraction": float(mask.float().mean())}
