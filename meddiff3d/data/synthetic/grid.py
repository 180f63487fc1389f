"""The output grid of the synthetic generators and the sampling helpers every generator shares.

Conventions
-----------
* Arrays are indexed ``[i, j, k]`` along world ``x, y, z`` in RAS+ (x: left -> right, y: posterior -> anterior,
  z: inferior -> superior); the affine is diagonal with positive spacing, so ``nib.aff2axcodes == ('R', 'A', 'S')``.
* World coordinates are MNI millimetres (the anatomy is the MNI152 2009c template or a procedural brain placed like it).
* Every generated volume covers the same box, :data:`FOV_MM` = 160 x 224 x 160 mm, with its low corner at
  :data:`FOV_LOW_MM`. The box is centred on the MNI brain and its faces lie on MNI voxel edges, so the full-size grid
  (160 x 224 x 160 at 1 mm) samples the template exactly, without interpolation.
* A grid of ``shape`` splits the box into ``shape`` voxels: ``spacing = FOV / shape`` and voxel ``i`` has its centre at
  ``low + (i + 0.5) * spacing`` (this is the affine's translation for ``i = 0``).
* Displacement fields are ``(3, *shape)`` float32 arrays in mm, channels in world ``x, y, z`` order. A warp reads
  ``out(p) = in(p + u(p))`` (backward / pull-back warping).

Because all grids of the toolkit cover the same box, any field can be sampled on any other grid by world coordinates:
random fields are drawn on lattices whose size depends only on their correlation length, so a subject's anatomy is the
same at every output resolution (only the per-voxel noise differs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

FOV_MM = (160.0, 224.0, 160.0)
FOV_LOW_MM = (-80.5, -128.5, -74.5)
DEFAULT_SHAPE = (160, 224, 160)


@dataclass(frozen=True)
class Grid:
    """A box in world mm split into ``shape`` voxels (RAS, diagonal affine)."""

    shape: tuple[int, int, int] = DEFAULT_SHAPE
    fov_mm: tuple[float, float, float] = FOV_MM
    low_mm: tuple[float, float, float] = FOV_LOW_MM
    _axes: list = field(default_factory=list, repr=False, compare=False, hash=False)

    @property
    def spacing(self) -> np.ndarray:
        return np.asarray(self.fov_mm, dtype=np.float64) / np.asarray(self.shape, dtype=np.float64)

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    @property
    def affine(self) -> np.ndarray:
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = np.asarray(self.low_mm) + 0.5 * self.spacing
        return affine

    def axes(self) -> list[np.ndarray]:
        """World coordinate of the voxel centres along each axis (three 1D float32 arrays)."""
        if not self._axes:
            self._axes.extend(
                (lo + (np.arange(n) + 0.5) * s).astype(np.float32)
                for lo, n, s in zip(self.low_mm, self.shape, self.spacing)
            )
        return self._axes

    def world(self) -> np.ndarray:
        """World coordinates of all voxel centres, ``(*shape, 3)`` float32."""
        x, y, z = self.axes()
        out = np.empty((*self.shape, 3), dtype=np.float32)
        out[..., 0] = x[:, None, None]
        out[..., 1] = y[None, :, None]
        out[..., 2] = z[None, None, :]
        return out

    def coarsened(self, spacing_mm: float) -> "Grid":
        """A grid over the same box with voxels of about ``spacing_mm`` (at least 2 per axis)."""
        shape = tuple(max(2, int(round(f / spacing_mm))) for f in self.fov_mm)
        return Grid(shape=shape, fov_mm=self.fov_mm, low_mm=self.low_mm)

    def world_to_voxel(self, point_mm) -> np.ndarray:
        return (np.asarray(point_mm, dtype=np.float64) - np.asarray(self.low_mm)) / self.spacing - 0.5


def grid_for_shape(shape=DEFAULT_SHAPE) -> Grid:
    """The standard synthetic grid with ``shape`` voxels (spacing = 160 x 224 x 160 mm / shape)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 4:
        from meddiff3d.errors import InputError

        raise InputError(f"synthetic shape {shape}: need three sizes of at least 4 voxels")
    return Grid(shape=shape)


def sample(volume: np.ndarray, source: Grid, points_mm: np.ndarray, mode: str = "bilinear",
           padding: str = "zeros") -> np.ndarray:
    """Sample ``volume`` (``source.shape`` or ``(C, *source.shape)``) at world points ``(..., 3)``.

    Trilinear (``mode="bilinear"``) or nearest; ``padding`` is ``"zeros"`` or ``"border"``. Returns ``(...)`` or
    ``(C, ...)`` float32, matching the channel layout of ``volume``.
    """
    squeeze = volume.ndim == 3
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    vol = vol[None, None] if squeeze else vol[None]
    pts = np.asarray(points_mm, dtype=np.float32)
    lead = pts.shape[:-1]
    low = np.asarray(source.low_mm, dtype=np.float32)
    fov = np.asarray(source.fov_mm, dtype=np.float32)
    norm = (pts.reshape(-1, 3) - low) * (2.0 / fov) - 1.0
    # grid_sample wants (x, y, z) = (W, H, D) = our axes (2, 1, 0)
    grid = torch.from_numpy(np.ascontiguousarray(norm[:, ::-1])).view(1, 1, 1, -1, 3)
    with torch.no_grad():
        out = F.grid_sample(vol, grid, mode=mode, padding_mode=padding, align_corners=False)
    out = out.view(vol.shape[1], *lead).numpy()
    return out[0] if squeeze else out


def resample(volume: np.ndarray, source: Grid, target: Grid, padding: str = "zeros", antialias: bool = True):
    """Resample a volume between two grids by world coordinates, Gaussian pre-smoothing when downsampling."""
    vol = np.asarray(volume, dtype=np.float32)
    if antialias:
        ratio = target.spacing / source.spacing
        sigma = [0.5 * np.sqrt(max(r * r - 1.0, 0.0)) for r in ratio]
        if max(sigma) > 0.05:
            if vol.ndim == 4:
                vol = np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest") for c in vol])
            else:
                vol = ndimage.gaussian_filter(vol, sigma, mode="nearest")
    return sample(vol, source, target.world(), padding=padding)


def smooth_noise(rng: np.random.Generator, grid: Grid, correlation_mm: float, channels: int = 1) -> np.ndarray:
    """Smooth Gaussian random field(s) of unit standard deviation, ``(channels, *grid.shape)`` float32.

    White noise on a lattice of spacing ``correlation_mm / 2`` over the standard box, smoothed by one lattice voxel and
    interpolated trilinearly; the lattice does not depend on ``grid.shape``.
    """
    lattice = Grid(fov_mm=grid.fov_mm, low_mm=grid.low_mm).coarsened(correlation_mm / 2.0)
    white = rng.standard_normal((channels, *lattice.shape), dtype=np.float32)
    smooth = np.stack([ndimage.gaussian_filter(c, 1.0, mode="wrap") for c in white])
    smooth /= np.maximum(smooth.std(axis=(1, 2, 3), keepdims=True), 1e-6)
    return sample(smooth, lattice, grid.world(), padding="border")
