"""Feature extractors for a Fréchet distance between sets of volumes, and the distance itself.

No pretrained network may be downloaded, so two fixed extractors are provided (both deterministic):

* :class:`RandomConvFeatures` -- a randomly initialised 3D CNN, fixed by its seed (:data:`FEATURE_SEED`): the volume,
  clipped to [0, 1.5] and resized trilinearly to :data:`FEATURE_SHAPE`, goes through four blocks
  ``Conv3d(3x3x3, stride 2) -> LeakyReLU(0.2)`` with 16, 32, 64, 128 channels (Kaiming-normal weights from a
  ``torch.Generator`` seeded with ``FEATURE_SEED``, zero biases); the features are the spatial mean and standard
  deviation of every channel of every block (2 x 240 = 480 numbers). Random-feature Fréchet distances are a known,
  weaker proxy for FID / FID-with-MedicalNet: they react to intensity, texture and coarse shape statistics, not to
  learned anatomy; compare them only with the real-vs-real floor computed the same way.
* :func:`handcrafted_features` -- a normalised intensity histogram of the brain (:data:`HIST_BINS` bins over
  [0, 1.2] of the intensity divided by its brain 99th percentile) plus the morphometry of
  :func:`~meddiff3d.evaluation.morphometry.measure_volumes` (brain, ventricular and intracranial volume, CSF / GM means
  relative to WM): interpretable, low-dimensional.

:func:`frechet_distance` fits a Gaussian to each set and returns ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``,
with the matrix square root taken through symmetric eigendecompositions (real and stable for the rank-deficient
covariances of small sets). With few volumes the estimate is biased upwards, which is why every report gives the
real-vs-real floor at matching set sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RandomConvFeatures", "handcrafted_features", "frechet_distance", "FEATURE_SEED", "FEATURE_SHAPE",
           "HIST_BINS"]

FEATURE_SEED = 1234
FEATURE_SHAPE = (64, 80, 64)
FEATURE_CHANNELS = (16, 32, 64, 128)
HIST_BINS = 16


class RandomConvFeatures(nn.Module):
    """The fixed random 3D CNN of the module docstring; ``features(volume) -> (480,)`` numpy."""

    def __init__(self, seed: int = FEATURE_SEED, channels: Sequence[int] = FEATURE_CHANNELS,
                 shape: Sequence[int] = FEATURE_SHAPE) -> None:
        super().__init__()
        self.seed, self.shape = int(seed), tuple(int(s) for s in shape)
        gen = torch.Generator().manual_seed(self.seed)
        blocks, c_in = [], 1
        for c_out in channels:
            conv = nn.Conv3d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * np.sqrt(2.0 / (c_in * 27)))
                conv.bias.zero_()
            blocks.append(conv)
            c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.eval()

    def describe(self) -> dict:
        return {"name": "RandomConvFeatures", "seed": self.seed, "input_shape": list(self.shape),
                "input_clip": [0.0, 1.5], "blocks": "Conv3d(3, stride 2, pad 1) + LeakyReLU(0.2)",
                "channels": [int(b.out_channels) for b in self.blocks], "init": "kaiming-normal, zero bias",
                "features": "per-channel spatial mean and std of every block", "dim": 2 * sum(
                    int(b.out_channels) for b in self.blocks)}

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.clamp(0.0, 1.5), size=self.shape, mode="trilinear", align_corners=False)
        feats = []
        for conv in self.blocks:
            x = F.leaky_relu(conv(x), 0.2)
            feats += [x.mean(dim=(2, 3, 4)), x.std(dim=(2, 3, 4))]
        return torch.cat(feats, dim=1)

    def features(self, volume) -> np.ndarray:
        t = torch.as_tensor(np.asarray(volume, dtype=np.float32))
        return self(t.reshape(1, 1, *t.shape[-3:]))[0].numpy().astype(np.float64)


def handcrafted_features(volume, morphometry: Mapping[str, float]) -> np.ndarray:
    """Brain intensity histogram (:data:`HIST_BINS` bins) + the five morphometry numbers (module docstring)."""
    v = np.asarray(volume, dtype=np.float64).reshape(np.shape(volume)[-3:])
    positive = v[v > 0]
    hist = np.zeros(HIST_BINS)
    if positive.size:
        scale = max(np.percentile(positive, 99), 1e-8)
        brain = positive[positive > 0.1 * scale] / scale
        hist, _ = np.histogram(np.clip(brain, 0.0, 1.2), bins=HIST_BINS, range=(0.0, 1.2))
        hist = hist / max(hist.sum(), 1)
    morph = [morphometry.get(k, np.nan) for k in ("brain_ml", "ventricular_ml", "intracranial_ml", "csf_mean",
                                                  "gm_mean")]
    return np.concatenate([hist, np.nan_to_num(np.asarray(morph, dtype=np.float64))])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to the rows of ``a`` and ``b`` (``(n, d)``, n >= 2 each)."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Fréchet distance needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False).reshape(a.shape[1], -1), np.cov(b, rowvar=False).reshape(b.shape[1], -1)
    r1 = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0.0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * cross)
