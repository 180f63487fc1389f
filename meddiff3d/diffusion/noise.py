"""Noise for the forward process: Gaussian, and multi-octave 3D simplex noise (AnoDDPM, Wyatt et al. 2022).

Simplex noise is spatially correlated, so a model trained to remove it removes structures the size of lesions
rather than voxel-level noise -- the basis of AnoDDPM-style anomaly detection. :func:`simplex_noise` is a vectorised
torch implementation of Gustavson's 3D simplex noise (12 edge gradients, a seeded permutation table), summed over
octaves and normalised per channel to zero mean and unit variance so it can stand in for Gaussian noise. 2D fields
are slices of the 3D noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meddiff3d.errors import InputError

from .tensor_utils import as_generator

__all__ = ["gaussian_noise", "simplex_noise", "simplex_noise_3d"]

_GRADIENTS = torch.tensor(
    [[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0], [1, 0, 1], [-1, 0, 1],
     [1, 0, -1], [-1, 0, -1], [0, 1, 1], [0, -1, 1], [0, 1, -1], [0, -1, -1]],
    dtype=torch.float32,
)
_F3, _G3 = 1.0 / 3.0, 1.0 / 6.0
_CHUNK_VOXELS = 1 << 14


def gaussian_noise(shape: Sequence[int], generator: torch.Generator | int | None = None,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise; ``generator`` a ``torch.Generator``, an int seed, or ``None`` (global RNG)."""
    generator = as_generator(generator, "cpu")
    return torch.randn(tuple(shape), generator=generator, dtype=dtype).to(device)


def _gradient_tables(perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient components looked up by the last hash value (folds the final ``perm`` lookup and ``% 12``)."""
    g = _GRADIENTS.to(perm.device)[perm[perm] % 12]
    return g[:, 0].contiguous(), g[:, 1].contiguous(), g[:, 2].contiguous()


def simplex_noise_3d(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, perm: torch.Tensor,
                     gradient_tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Raw 3D simplex noise (range about [-1, 1]) at points ``(x, y, z)`` (broadcastable float32 tensors).

    ``perm`` is a permutation of ``0..255`` doubled to length 512 (the hash table). Written for speed: in-place
    arithmetic and ``torch.take`` lookups; call it on cache-sized chunks (see :func:`simplex_noise`).
    """
    gx, gy, gz = _gradient_tables(perm) if gradient_tables is None else gradient_tables
    skew = (x + y) + z
    skew *= _F3
    xi, yj, zk = torch.floor(x + skew), torch.floor(y + skew), torch.floor(z + skew)
    unskew = (xi + yj) + zk
    unskew *= _G3
    x0 = x - xi
    x0 += unskew
    y0 = y - yj
    y0 += unskew
    z0 = z - zk
    z0 += unskew
    i, j, k = xi.long() & 255, yj.long() & 255, zk.long() & 255
    # Which of the six tetrahedra of the skewed cube: the 2nd corner steps along the largest offset, the 3rd along
    # the two largest.
    x_ge_y, x_ge_z, y_ge_z = x0 >= y0, x0 >= z0, y0 >= z0
    second = (x_ge_y & x_ge_z, ~x_ge_y & y_ge_z, ~(x_ge_z | y_ge_z))
    third = (x_ge_y | x_ge_z, ~x_ge_y | y_ge_z, ~(x_ge_z & y_ge_z))
    total = torch.zeros_like(x0)
    for corner in range(4):
        g = corner * _G3
        if corner == 0:
            dx, dy, dz, ii, jj, kk = x0, y0, z0, i, j, k
        elif corner == 3:
            dx, dy, dz, ii, jj, kk = x0 + (g - 1), y0 + (g - 1), z0 + (g - 1), i + 1, j + 1, k + 1
        else:
            step = second if corner == 1 else third
            dx, dy, dz = (x0 - step[0].float()).add_(g), (y0 - step[1].float()).add_(g), (z0 - step[2].float()).add_(g)
            ii, jj, kk = i + step[0], j + step[1], k + step[2]
        h = torch.take(perm, kk).add_(jj)
        h = torch.take(perm, h).add_(ii)  # the last lookup perm[h] is folded into the gradient tables
        falloff = 0.6 - dx * dx
        falloff -= dy * dy
        falloff -= dz * dz
        falloff.clamp_(min=0.0)
        falloff *= falloff
        falloff *= falloff
        dot = torch.take(gx, h) * dx
        dot += torch.take(gy, h) * dy
        dot += torch.take(gz, h) * dz
        total += dot.mul_(falloff)
    return total.mul_(32.0)


def simplex_noise(shape: Sequence[int], *, octaves: int = 6, persistence: float = 0.8, scale: float = 64.0,
                  generator: torch.Generator | int | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Multi-octave simplex noise of ``shape = (B, C, *spatial)`` (2 or 3 spatial dims), zero mean, unit variance.

    Args:
        octaves: number of octaves; octave ``o`` has features of ``scale / 2**o`` voxels and amplitude
            ``persistence**o`` (AnoDDPM: 6 octaves, persistence 0.8).
        scale: feature size of the first octave, in voxels.
        generator: seeds the permutation table and the random offsets (a ``torch.Generator``, an int, or ``None``).

    Each ``(b, c)`` field is independent and normalised to zero mean and unit variance over its voxels.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (4, 5):
        raise InputError(f"simplex_noise needs (B, C, *spatial) with 2 or 3 spatial dims, got {shape}")
    if octaves < 1 or scale <= 0:
        raise InputError(f"simplex_noise needs octaves >= 1 and scale > 0, got {octaves}, {scale}")
    generator = as_generator(generator, "cpu")
    spatial = shape[2:] + (1,) * (5 - len(shape))  # 2D fields are slices of the 3D noise
    out = torch.empty((shape[0] * shape[1],) + spatial, dtype=torch.float32, device=device)
    _fill_fields(out, spatial, octaves, persistence, scale, generator, device)
    return out.reshape(shape).to(dtype)


def _fill_fields(out, spatial, octaves, persistence, scale, generator, device) -> None:
    for field_index in range(out.shape[0]):
        perm = torch.randperm(256, generator=generator)
        perm = torch.cat([perm, perm]).to(device)
        tables = _gradient_tables(perm)
        offsets = torch.rand((octaves, 3), generator=generator, dtype=torch.float64) * 256.0
        total = torch.zeros(spatial, dtype=torch.float32, device=device)
        for o in range(octaves):
            frequency = 2.0**o / scale
            x, y, z = (
                (torch.arange(n, device=device, dtype=torch.float64) * frequency + float(offsets[o, d])).to(torch.float32)
                for d, n in enumerate(spatial)
            )
            # Blocks of 16k voxels stay in cache: several times faster than whole-volume elementwise ops.
            cols = max(1, min(spatial[1], _CHUNK_VOXELS // spatial[2]))
            amplitude = persistence**o
            for r in range(spatial[0]):
                for c in range(0, spatial[1], cols):
                    block = (x[r : r + 1, None, None], y[None, c : c + cols, None], z[None, None, :])
                    noise = simplex_noise_3d(*block, perm, tables)
                    total[r : r + 1, c : c + cols] += amplitude * noise
        total -= total.mean()
        total /= total.std().clamp(min=1e-12)
        out[field_index] = total
