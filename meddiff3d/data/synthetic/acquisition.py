"""Scanner and population variants of the synthetic subjects: domain randomisation and the out-of-template families.

A subject's *variant* (:data:`VARIANTS`) decides how its images are acquired and, for the out-of-template families,
how its anatomy departs from the template's warps; the anatomy stream (covariates, individual shape) is the same for
every variant, so subject ``k`` has the same age, sex, ventricles and head size in all of them. The variant's own
draws come from a separate ``variant`` stream (:func:`meddiff3d.data.synthetic.subjects.subject_rng`).

``standard``
    the template contrast table (:data:`~.contrast.TISSUE_INTENSITY`, 5 % jitter per class, global gain x
    exp(N(0, 0.1))), bias field strength 0.15, Rician noise sigma U(0.01, 0.04), isotropic 1 mm.
``varied`` -- domain randomisation for training (SynthSeg-style ideas, keeping each sequence's tissue order)
    T1 white matter U(0.65, 1.0), grey matter = WM x U(0.60, 0.85), CSF = WM x U(0.10, 0.40), the other classes and
    sequences x exp(U(-0.15, 0.15)) per class; a global gamma U(0.8, 1.25) about white matter; bias strength
    U(0.05, 0.35); noise sigma U(0.005, 0.06); with probability 1/2 a thick-slice acquisition (slice thickness
    U(2, 5) mm along a random axis: a Gaussian slice profile, sampled at the slice spacing and interpolated back
    linearly); a head rotation of up to 8 degrees about each axis (anatomy and labels rotate together).
``asymmetric`` -- out-of-template family: a left-right asymmetric warp the training cohorts never use
    Yakovlevian torque (the right hemisphere pushed forward and the left back by U(4, 8) mm, a shear across the
    midline, ``v_y = T tanh(x / 15 mm)``) and a midline bent to the left in front by U(3, 6) mm; standard contrast.
``contrast`` -- out-of-template family: contrasts outside the ``varied`` ranges
    flat (T1 grey/white ratio U(0.86, 0.93), as on older or spin-echo T1; CSF = WM x U(0.45, 0.60); gamma
    U(0.6, 0.75)) or steep (ratio U(0.40, 0.55), CSF = WM x U(0.02, 0.08), gamma U(1.35, 1.6)), one of the two per
    image; bias strength U(0.4, 0.6), noise sigma U(0.06, 0.09), slices U(5, 7) mm along a random axis.

The third out-of-template family, ``phantom``, is the procedural anatomy (nested ellipsoids) with standard contrast:
it is chosen by the cohort (:func:`~.cohorts.write_cohort`, ``variant="out_of_template"``), not here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .grid import Grid

VARIANTS = ("standard", "varied", "asymmetric", "contrast")
OUT_OF_TEMPLATE_FAMILIES = ("asymmetric", "contrast", "phantom")
ROTATION_MAX_DEG = 8.0


@dataclass(frozen=True)
class Scanner:
    """How one image is acquired: intensity gamma, bias strength, noise sigma and an optional thick-slice axis."""

    gamma: float = 1.0
    bias_strength: float = 0.15
    noise_sigma: float | None = None  # None: the standard U(0.01, 0.04)
    slice_axis: int | None = None
    slice_mm: float = 0.0


def draw_acquisition(rng: np.random.Generator, sequence: str, table: dict[str, float],
                     variant: str) -> tuple[dict[str, float], Scanner]:
    """Tissue intensities and acquisition of one ``varied`` or ``contrast`` image (see the module docstring).

    The ``contrast`` family draws one direction per image: flat (grey/white ratio U(0.86, 0.93), CSF bright,
    gamma < 1 flattening further) or steep (ratio U(0.40, 0.55), CSF dark, gamma > 1), so the effective T1
    grey/white ratio ``ratio ** gamma`` stays outside the ``varied`` range (0.53-0.88): 0.89-0.96 or 0.23-0.45.
    """
    mu = {name: value * float(np.exp(rng.uniform(-0.15, 0.15))) for name, value in table.items()}
    if variant == "varied":
        if sequence == "t1":
            wm = float(rng.uniform(0.65, 1.0))
            mu.update(wm=wm, gm=wm * float(rng.uniform(0.60, 0.85)), csf=wm * float(rng.uniform(0.10, 0.40)))
        thick = rng.random() < 0.5
        scanner = Scanner(gamma=float(rng.uniform(0.8, 1.25)), bias_strength=float(rng.uniform(0.05, 0.35)),
                          noise_sigma=float(rng.uniform(0.005, 0.06)),
                          slice_axis=int(rng.integers(3)) if thick else None,
                          slice_mm=float(rng.uniform(2.0, 5.0)) if thick else 0.0)
        return mu, scanner
    if variant != "contrast":
        raise ValueError(f"no acquisition draw for variant {variant!r}")
    flat = rng.random() < 0.5
    if sequence == "t1":
        wm = float(rng.uniform(0.65, 1.0))
        ratio = rng.uniform(0.86, 0.93) if flat else rng.uniform(0.40, 0.55)
        csf = rng.uniform(0.45, 0.60) if flat else rng.uniform(0.02, 0.08)
        mu.update(wm=wm, gm=wm * float(ratio), csf=wm * float(csf))
    gamma = rng.uniform(0.6, 0.75) if flat else rng.uniform(1.35, 1.6)
    scanner = Scanner(gamma=float(gamma), bias_strength=float(rng.uniform(0.4, 0.6)),
                      noise_sigma=float(rng.uniform(0.06, 0.09)), slice_axis=int(rng.integers(3)),
                      slice_mm=float(rng.uniform(5.0, 7.0)))
    return mu, scanner


def apply_gamma(image: np.ndarray, gamma: float, reference: float) -> np.ndarray:
    """``reference * (image / reference) ** gamma`` (white matter stays where it is)."""
    if gamma == 1.0:
        return image
    return (reference * np.power(np.maximum(image, 0.0) / reference, gamma)).astype(np.float32)


def thick_slices(image: np.ndarray, grid: Grid, axis: int, slice_mm: float) -> np.ndarray:
    """A thick-slice acquisition along ``axis`` interpolated back to ``grid``: a Gaussian slice profile (FWHM
    ``slice_mm``), samples every ``slice_mm``, linear interpolation back to the voxel centres."""
    step = float(grid.spacing[axis])
    if slice_mm <= step:
        return image
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = slice_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / step
    blurred = ndimage.gaussian_filter(image, sigma, mode="nearest")
    n = image.shape[axis]
    stride = slice_mm / step
    centres = np.arange(0.5 * stride - 0.5, n, stride)
    coarse = _interpolate_along(blurred, axis, centres)
    return _interpolate_along(coarse, axis, (np.arange(n) - centres[0]) / stride).astype(np.float32)


def _interpolate_along(volume: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``volume`` at fractional indices ``positions`` along ``axis`` (clamped to its ends)."""
    positions = np.clip(positions, 0.0, volume.shape[axis] - 1.0)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, volume.shape[axis] - 1)
    weight = (positions - low).astype(np.float32)
    shape = [1, 1, 1]
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    return np.take(volume, low, axis=axis) * (1.0 - weight) + np.take(volume, high, axis=axis) * weight


def rotation_velocity(rng: np.random.Generator, lattice: Grid, centre_mm) -> np.ndarray:
    """The velocity of a head rotation of up to :data:`ROTATION_MAX_DEG` about each axis through ``centre_mm``:
    ``v(p) = W (p - c)`` with ``W`` skew-symmetric, whose exponential is the rotation ``exp(W)``."""
    ax, ay, az = np.deg2rad(rng.uniform(-ROTATION_MAX_DEG, ROTATION_MAX_DEG, 3))
    skew = np.array([[0.0, -az, ay], [az, 0.0, -ax], [-ay, ax, 0.0]], dtype=np.float32)
    rel = lattice.world() - np.asarray(centre_mm, dtype=np.float32)
    return np.moveaxis(rel @ skew.T, -1, 0).astype(np.float32)


def torque_velocity(rng: np.random.Generator, lattice: Grid, centre_mm) -> np.ndarray:
    """The ``asymmetric`` family's warp: torque ``v_y = T tanh(x / 15 mm)`` (RAS: the right hemisphere forward) and
    a midline bent to the left in front, ``v_x = B exp(-(y - y_front)^2 / (2 * 30^2))`` (pull-back warps move tissue
    against the velocity, so the signs give that direction)."""
    torque, bend = float(rng.uniform(4.0, 8.0)), float(rng.uniform(3.0, 6.0))
    rel = lattice.world() - np.asarray(centre_mm, dtype=np.float32)
    velocity = np.zeros((3, *lattice.shape), dtype=np.float32)
    velocity[1] = -torque * np.tanh(rel[..., 0] / 15.0)
    velocity[0] = bend * np.exp(-((rel[..., 1] - 40.0) ** 2) / (2.0 * 30.0**2))
    return velocity
