"""Linear measurement operators ``y = A(x) + noise`` for inverse problems with a diffusion prior.

Every operator maps a real batch ``x`` of shape ``(B, C, *spatial)`` (2D or 3D) to its measurement and gives what
:class:`~.data_consistency.DataConsistency` needs:

* ``forward(x)`` -- ``A x``;
* ``adjoint(y)`` -- ``A^T y`` for the real inner product (``Re <a, b>`` on complex measurements);
* ``back_project(r, noise_var, prior_var)`` -- ``A^T (noise_var I + prior_var A A^T)^+ r``, in closed form. With
  ``noise_var = 0`` and ``prior_var = 1`` this is the pseudo-inverse ``A^+ r``.

==========================  =====================================================  ==============================
operator                    ``A x``                                                ``A A^T``
==========================  =====================================================  ==============================
:class:`MaskOperator`       ``mask * x`` (inpainting; measurement on x's grid)      ``diag(mask)``
:class:`Downsample`         block means of ``factors`` voxels (super-resolution)   ``I / prod(factors)``
:class:`KSpaceSampling`     ``mask * fft2c(x)`` (Cartesian undersampled MRI)       see the class
==========================  =====================================================  ==============================

k-space follows the fastMRI convention: the orthonormal 2D FFT over the last two axes with the zero frequency at
index ``n // 2`` (:func:`fft2c`, :func:`ifft2c`); :func:`cartesian_mask` draws the phase-encoding lines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from meddiff3d.errors import InputError

__all__ = ["fft2c", "ifft2c", "cartesian_mask", "MaskOperator", "Downsample", "KSpaceSampling", "MASK_KINDS"]

MASK_KINDS = ("random", "equispaced")


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes (zero frequency at index ``n // 2``)."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=dims), norm="ortho"), dim=dims)


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c`."""
    dims = (-2, -1)
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k, dim=dims), norm="ortho"), dim=dims)


def cartesian_mask(columns: int, acceleration: float, center_fraction: float, kind: str = "random",
                   seed: int = 0) -> torch.Tensor:
    """Which of ``columns`` phase-encoding lines are sampled (bool, ``(columns,)``), as fastMRI's mask functions: the
    central ``round(columns * center_fraction)`` lines always, and others so that about ``columns / acceleration``
    are sampled in all -- each with the same probability (``"random"``), or equispaced from a random offset, every
    ``acceleration (columns - low) / (columns - low acceleration)`` lines (``"equispaced"``). fastMRI's settings:
    4x with 8 % centre, 8x with 4 %."""
    if kind not in MASK_KINDS:
        raise InputError(f"unknown k-space mask kind {kind!r}; valid: {list(MASK_KINDS)}")
    if not (isinstance(columns, int) and columns >= 2):
        raise InputError(f"k-space mask needs at least 2 columns, got {columns!r}")
    if not (math.isfinite(acceleration) and acceleration >= 1):
        raise InputError(f"acceleration must be a number >= 1, got {acceleration!r}")
    if not (isinstance(center_fraction, (int, float)) and math.isfinite(center_fraction) and center_fraction > 0):
        raise InputError(f"center_fraction must be a finite number > 0, got {center_fraction!r}")
    low = max(1, round(columns * center_fraction))
    if not low * acceleration < columns:
        raise InputError(f"center_fraction must be > 0 and leave lines to undersample (round(columns * "
                         f"center_fraction) * acceleration < columns = {columns}), got {center_fraction!r}")
    generator = torch.Generator().manual_seed(int(seed))
    mask = torch.zeros(columns, dtype=torch.bool)
    start = (columns - low + 1) // 2
    mask[start:start + low] = True
    if kind == "random":
        mask |= torch.rand(columns, generator=generator) < (columns / acceleration - low) / (columns - low)
    else:
        spacing = acceleration * (columns - low) / (columns - low * acceleration)
        offset = int(torch.randint(0, max(1, round(spacing)), (1,), generator=generator))
        mask[torch.arange(offset, columns - 1, spacing).round().long()] = True  # fastMRI's EquispacedMaskFunc
    return mask


class MaskOperator:
    """``A x = mask * x``: keep the voxels where ``mask`` is 1 (inpainting). The measurement lives on ``x``'s grid,
    zero where nothing is measured; ``mask`` broadcasts against ``(B, C, *spatial)``."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = torch.as_tensor(mask).float()
        if not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise InputError("inpainting mask must hold only 0 and 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask.to(x) * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.mask.to(y) * y

    def back_project(self, r: torch.Tensor, noise_var: float | torch.Tensor, prior_var: float | torch.Tensor):
        mask = self.mask.to(r)
        return mask * r / torch.where(mask > 0, noise_var + prior_var * mask, torch.ones_like(mask))


class Downsample:
    """``A x`` = the mean of each block of ``factors`` voxels over the spatial axes (``(2, 2)``: 2x super-resolution
    of an image; ``(1, 1, 4)``: 4 mm thick slices of a 1 mm volume). Every spatial size must be a multiple of its
    factor. ``A^T`` spreads each measured value evenly over its block, so ``A A^T = I / prod(factors)``."""

    def __init__(self, factors: Sequence[int]) -> None:
        self.factors = tuple(int(f) for f in factors)
        if not self.factors or len(self.factors) > 3 or min(self.factors) < 1:
            raise InputError(f"downsampling factors must be 1-3 integers >= 1, got {list(factors)}")
        self.size = math.prod(self.factors)

    def _check(self, x: torch.Tensor) -> None:
        spatial = tuple(x.shape[2:])
        if len(spatial) != len(self.factors) or any(s % f for s, f in zip(spatial, self.factors)):
            raise InputError(f"image of spatial shape {list(spatial)} cannot be downsampled by "
                             f"{list(self.factors)}: each size must be a multiple of its factor")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(self.factors) - 1]
        return pool(x, self.factors)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        for axis, factor in enumerate(self.factors):
            y = y.repeat_interleave(factor, dim=2 + axis)
        return y / self.size

    def back_project(self, r: torch.Tensor, noise_var: float | torch.Tensor, prior_var: float | torch.Tensor):
        return self.adjoint(r) / (noise_var + prior_var / self.size)


class KSpaceSampling:
    """``A x = mask * fft2c(x)``: Cartesian undersampled single-coil k-space of a real image (the last two axes are
    the image plane; a 3D batch is sampled slice by slice). ``mask`` broadcasts against the k-space grid, e.g. a
    :func:`cartesian_mask` of the last axis. The measurement is complex, zero where nothing is sampled.

    For a real image ``k(-f) = conj(k(f))``, so ``A A^T = M (I + J) / 2 M`` with ``J k = fft2c(conj(ifft2c(k)))``
    (``(Jk)(f) = conj(k(-f))``): on frequencies sampled together with their mirror it keeps the Hermitian-symmetric
    part of a residual (eigenvalue 1; the antisymmetric part, 0, is no real image's), and halves it on frequencies
    sampled without their mirror. ``back_project`` inverts it accordingly."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = torch.as_tensor(mask).float()
        if self.mask.ndim < 1 or not bool(((self.mask == 0) | (self.mask == 1)).all()):
            raise InputError("k-space mask must hold only 0 and 1")

    def _mask(self, like: torch.Tensor) -> torch.Tensor:
        """The mask on ``like``'s (k-space) grid, in its real dtype."""
        try:
            shape = torch.broadcast_shapes(self.mask.shape, like.shape)
        except RuntimeError:
            raise InputError(f"k-space mask of shape {list(self.mask.shape)} does not broadcast to the k-space of "
                             f"shape {list(like.shape)}") from None
        return self.mask.to(like.device, like.real.dtype).expand(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = fft2c(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
        return self._mask(k) * k

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return ifft2c(self._mask(y) * y).real

    @staticmethod
    def mirror(k: torch.Tensor) -> torch.Tensor:
        """``(Jk)(f) = conj(k(-f))``."""
        return fft2c(ifft2c(k).conj())

    def back_project(self, r: torch.Tensor, noise_var: float | torch.Tensor, prior_var: float | torch.Tensor):
        mask = self._mask(r)
        r = mask * r
        paired = mask * self.mirror(mask.to(r.dtype)).real.round()  # sampled together with its mirror
        symmetric = paired * (r + self.mirror(r)) / 2  # the antisymmetric part: A^T maps it to zero
        alone = (mask - paired) * r
        return self.adjoint(symmetric / (noise_var + prior_var) + alone / (noise_var + prior_var / 2))
