"""Volume-to-volume (and image-to-image) similarity: MS-SSIM (diversity) and nearest-neighbour correlation
(memorisation).

MS-SSIM is MONAI's :class:`~monai.metrics.MultiScaleSSIMMetric` in 3D on volumes clipped to the model's intensity
range [0, 1] (``data_range=1``). MONAI refuses volumes whose every side is not larger than
``(kernel_size - 1) * (len(weights) - 1) ** 2``: with its defaults (5 scales, 11^3 kernel) that is 160 voxels, too
much for 160 x 224 x 160. :func:`ms_ssim_config` therefore picks, for a shape, the first setting that fits from
:data:`MS_SSIM_SETTINGS` (5 scales with kernel 11, 9, 7, 5; then 4, 3 and 2 scales with the standard weights truncated
and renormalised); below the smallest it downsamples the volumes by 2 (average pooling) until one fits (or more,
if asked: ``min_downsample``). For 160 x 224 x 160 this is 5 scales with a 9^3 kernel at full resolution, for the
32 x 48 x 32 test volumes 3 scales with a 7^3 kernel; the setting used is reported.

Memorisation uses the Pearson correlation of volumes average-pooled to at most :data:`NN_MAX_SIDE` voxels per side
(brain-shape and coarse anatomy, cheap enough to compare every sample with every training subject).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["ms_ssim", "ms_ssim_config", "pairwise_ms_ssim", "pair_indices", "nn_vector", "nearest_neighbours",
           "MS_SSIM_WEIGHTS", "NN_MAX_SIDE"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_SETTINGS = [(5, k) for k in (11, 9, 7, 5)] + [(4, 7), (4, 5), (3, 7), (3, 5), (2, 5), (2, 3)]
NN_MAX_SIDE = 48


def _fits(shape: Sequence[int], scales: int, kernel: int) -> bool:
    div = max(1, scales - 1) ** 2  # MONAI's own size check
    return all(s // div > kernel - 1 and s // 2 ** (scales - 1) >= 1 for s in shape)


def ms_ssim_config(shape: Sequence[int], min_downsample: int = 1) -> dict:
    """``{"scales", "kernel_size", "weights", "downsample", "shape"}`` for volumes of ``shape`` (module docstring);
    ``min_downsample`` (a power of 2) average-pools at least that much (speed)."""
    factor = max(1, int(min_downsample))
    current = [int(s) // factor for s in shape]
    while min(current) >= 2:
        for scales, kernel in MS_SSIM_SETTINGS:
            if _fits(current, scales, kernel):
                w = np.asarray(MS_SSIM_WEIGHTS[:scales])
                return {"scales": scales, "kernel_size": kernel, "weights": [float(x) for x in w / w.sum()],
                        "downsample": factor, "shape": current}
        factor *= 2
        current = [s // 2 for s in current]
    raise ValueError(f"volume shape {tuple(shape)} is too small for MS-SSIM")


def _prepare(volume, factor: int, dims: int = 3) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(volume, dtype=np.float32)).clamp(0.0, 1.0)
    t = t.reshape(1, 1, *t.shape[-dims:])
    pool = F.avg_pool3d if dims == 3 else F.avg_pool2d
    return pool(t, factor) if factor > 1 else t


def ms_ssim(a, b, config: dict | None = None) -> float:
    """MS-SSIM of two 3D volumes or 2D images (model intensity scale, clipped to [0, 1]; the dimension is that of
    ``config["shape"]``, default 3D); 1 for identical inputs."""
    from monai.metrics import MultiScaleSSIMMetric

    config = config or ms_ssim_config(np.shape(a)[-3:])
    dims = len(config["shape"])
    metric = MultiScaleSSIMMetric(spatial_dims=dims, data_range=1.0, kernel_size=config["kernel_size"],
                                  weights=config["weights"])
    with torch.no_grad():
        value = metric(_prepare(a, config["downsample"], dims), _prepare(b, config["downsample"], dims))
    return float(value.reshape(-1)[0])


def pair_indices(groups: Sequence[int], max_pairs: int, within: bool | None = None, seed: int = 0) -> list[tuple]:
    """Up to ``max_pairs`` index pairs ``(i, j)``, ``i < j``, over items with group labels ``groups``:
    ``within=True`` only same-group pairs, ``False`` only different-group pairs, ``None`` all; a seeded subset."""
    pairs = [(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))
             if within is None or (groups[i] == groups[j]) == within]
    if len(pairs) > max_pairs:
        keep = np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)
        pairs = [pairs[k] for k in sorted(keep)]
    return pairs


def pairwise_ms_ssim(volumes: Sequence[np.ndarray], pairs: Sequence[tuple],
                     config: dict | None = None) -> list[float]:
    """MS-SSIM of each pair ``(i, j)`` of ``volumes``."""
    if not pairs:
        return []
    config = config or ms_ssim_config(np.shape(volumes[0])[-3:])
    return [ms_ssim(volumes[i], volumes[j], config) for i, j in pairs]


def nn_vector(volume, dims: int = 3, max_side: int = NN_MAX_SIDE) -> np.ndarray:
    """The volume (``dims=2``: image) average-pooled to at most ``max_side`` voxels per side, flattened and z-scored
    (float32): the dot product of two such vectors divided by their length is their Pearson correlation."""
    t = torch.as_tensor(np.asarray(volume, dtype=np.float32))
    t = t.reshape(1, 1, *t.shape[-dims:])
    factor = max(1, int(np.ceil(max(t.shape[2:]) / max_side)))
    if factor > 1:
        t = (F.avg_pool3d if dims == 3 else F.avg_pool2d)(t, factor, ceil_mode=True)
    v = t.reshape(-1).numpy().astype(np.float64)
    v = (v - v.mean()) / max(v.std(), 1e-12)
    return v.astype(np.float32)


def nearest_neighbours(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``queries`` (``nn_vector`` rows), the index of the most correlated row of ``references`` and
    that correlation."""
    q, r = np.atleast_2d(queries).astype(np.float64), np.atleast_2d(references).astype(np.float64)
    corr = q @ r.T / q.shape[1]
    idx = corr.argmax(1)
    return idx, corr[np.arange(len(q)), idx]
