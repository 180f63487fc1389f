"""Smooth invertible deformations: velocity fields, scaling and squaring, composition and warping.

Every anatomical change of the synthetic subjects (age, head size, individual shape, tumour mass effect) is a
stationary velocity field on a coarse *control lattice* (about 4 mm, over the standard box of :mod:`.grid`). Summing
velocities and integrating them by scaling and squaring gives a diffeomorphism (smooth, invertible: its inverse is the
exponential of ``-v``). Displacements are in mm, channels in world ``x, y, z`` order, and warps pull back:
``out(p) = in(p + u(p))``. A velocity pointing towards a structure therefore *grows* it, one pointing away shrinks it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .grid import Grid, sample, smooth_noise

CONTROL_SPACING_MM = 4.0


def control_lattice(grid: Grid) -> Grid:
    """The lattice velocities live on: about 4 mm over the standard box, independent of the output shape."""
    return Grid(fov_mm=grid.fov_mm, low_mm=grid.low_mm).coarsened(CONTROL_SPACING_MM)


def random_velocity(rng: np.random.Generator, lattice: Grid, correlation_mm: float, amplitude_mm: float) -> np.ndarray:
    """A smooth random velocity ``(3, *lattice.shape)`` with per-component standard deviation ``amplitude_mm``."""
    return amplitude_mm * smooth_noise(rng, lattice, correlation_mm, channels=3)


def scaling_velocity(lattice: Grid, scale: float, centre_mm) -> np.ndarray:
    """The velocity whose exponential scales space by ``scale`` about ``centre_mm`` (scale > 1 enlarges)."""
    rel = lattice.world() - np.asarray(centre_mm, dtype=np.float32)
    return np.moveaxis(-np.log(scale) * rel, -1, 0).astype(np.float32)


def radial_push_velocity(lattice: Grid, centre_mm, radius_mm: float, peak_mm: float) -> np.ndarray:
    """Mass effect: pushes tissue away from ``centre_mm``, at most ``peak_mm`` at ``radius_mm`` from the centre.

    ``v(p) = -k (p - c) exp(-|p - c|^2 / (2 r^2))``: zero at the centre and far away, so the far field is untouched.
    """
    rel = lattice.world() - np.asarray(centre_mm, dtype=np.float32)
    r2 = np.sum(rel * rel, axis=-1, keepdims=True)
    k = peak_mm / (radius_mm * np.exp(-0.5))
    return np.moveaxis(-k * rel * np.exp(-r2 / (2.0 * radius_mm**2)), -1, 0).astype(np.float32)


def attraction_field(mask_on_lattice: np.ndarray, lattice: Grid, sigma_mm: float) -> np.ndarray:
    """Unit-peak gradient of the Gaussian-smoothed ``mask``: points towards the structure, ``(3, *lattice.shape)``.

    Used as a velocity it enlarges the structure at the expense of its surroundings (outer tissue stays in place).
    """
    sigma = sigma_mm / lattice.spacing
    smooth = ndimage.gaussian_filter(mask_on_lattice.astype(np.float32), sigma, mode="constant")
    grad = np.stack(np.gradient(smooth, *lattice.spacing)).astype(np.float32)
    peak = float(np.sqrt((grad**2).sum(0)).max())
    return grad / max(peak, 1e-8)


def integrate_velocity(velocity: np.ndarray, lattice: Grid, steps: int = 6) -> np.ndarray:
    """Displacement ``exp(v) - id`` on the lattice by scaling and squaring: ``u <- u + u o (id + u)``."""
    u = velocity.astype(np.float32) / (2**steps)
    world = lattice.world()
    for _ in range(steps):
        u = u + sample(u, lattice, world + np.moveaxis(u, 0, -1), padding="border")
    return u


def compose(first: np.ndarray, then: np.ndarray, lattice: Grid) -> np.ndarray:
    """Displacement of applying warp ``first`` and then warp ``then`` (pull-back): ``then + first o (id + then)``."""
    world = lattice.world()
    return then + sample(first, lattice, world + np.moveaxis(then, 0, -1), padding="border")


def upsample_displacement(displacement: np.ndarray, lattice: Grid, grid: Grid) -> np.ndarray:
    """A lattice displacement sampled at the voxel centres of ``grid``, ``(3, *grid.shape)``."""
    return sample(displacement, lattice, grid.world(), padding="border")


def warp(volumes: np.ndarray, grid: Grid, displacement: np.ndarray, padding: str = "zeros") -> np.ndarray:
    """Pull-back warp of ``volumes`` (``(C, *shape)`` on ``grid``) by a displacement on the same grid (trilinear)."""
    points = grid.world()
    points += np.moveaxis(displacement, 0, -1)
    return sample(volumes, grid, points, padding=padding)


def jacobian_determinant(displacement: np.ndarray, spacing) -> np.ndarray:
    """Determinant of the Jacobian of ``id + u`` (finite differences); positive everywhere for a diffeomorphism."""
    grads = [np.gradient(displacement[c], *spacing) for c in range(3)]
    jac = np.empty((*displacement.shape[1:], 3, 3), dtype=np.float32)
    for r in range(3):
        for c in range(3):
            jac[..., r, c] = grads[r][c] + (1.0 if r == c else 0.0)
    return np.linalg.det(jac)
