"""A toy problem with a known answer for training tests: 2-D points from a mixture of four Gaussians.

* ``exact_denoiser(schedule)``: the closed-form ``E[x0 | x_t]`` (:class:`GaussianMixtureDenoiser`), so a sampler run on
  it is the reference a trained network is measured against (many steps of it approximate the exact flow map);
* ``ToyNet``: a small MLP with a sinusoidal timestep embedding, called as a MONAI U-Net is
  (``net(x, timesteps=t)`` on ``(B, C, *spatial)`` = ``(B, 2, 1)``), so the objectives, the trainer and the samplers
  run on it unchanged;
* ``toy_batches`` (data for ``meddiff3d.engine.train``) and two measures of a set of samples: ``mode_error`` (the
  largest per-mode weight error after assigning samples to the nearest mean) and ``energy_distance`` to exact draws.
"""

from __future__ import annotations

import math

import torch

from meddiff3d.diffusion import GaussianMixtureDenoiser

MEANS = torch.tensor([[-1.5, -1.5], [-1.5, 1.5], [1.5, -1.5], [1.5, 1.5]])
STD = 0.3
SHAPE = (2, 1)  # one sample: 2 channels, one voxel


def exact_denoiser(schedule) -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser(MEANS, STD, schedule)


def data(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` exact draws, ``(n, 2, 1)``."""
    return GaussianMixtureDenoiser(MEANS, STD, None).sample_data(n, torch.Generator().manual_seed(seed)).reshape(
        n, *SHAPE)


def toy_batches(batch_size: int = 256, seed: int = 0):
    """An endless iterator of ``{"image": (batch_size, 2, 1)}`` batches of fresh exact draws."""
    gen = torch.Generator().manual_seed(seed)
    mixture = GaussianMixtureDenoiser(MEANS, STD, None)
    while True:
        yield {"image": mixture.sample_data(batch_size, gen).reshape(batch_size, *SHAPE)}


class ToyNet(torch.nn.Module):
    """MLP ``(x, t) -> output`` with a sinusoidal embedding of ``t / T`` (``T = num_train_timesteps``)."""

    def __init__(self, width: int = 128, num_train_timesteps: int = 1000, frequencies: int = 16) -> None:
        super().__init__()
        self.scale = 1.0 / num_train_timesteps
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), frequencies)))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 + 2 * frequencies, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **_: object) -> torch.Tensor:
        t = torch.as_tensor(timesteps, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        angles = (t * self.scale)[:, None] * self.freqs[None]
        h = torch.cat([x.reshape(x.shape[0], 2).float(), angles.sin(), angles.cos()], dim=1)
        return self.mlp(h).reshape(x.shape).to(x.dtype)


def mode_error(samples: torch.Tensor) -> float:
    """Largest absolute error of the per-mode weights (each 0.25) after nearest-mean assignment."""
    flat = samples.reshape(samples.shape[0], 2).double()
    nearest = torch.cdist(flat, MEANS.double()).argmin(1)
    weights = torch.bincount(nearest, minlength=len(MEANS)).double() / len(flat)
    return float((weights - 1.0 / len(MEANS)).abs().max())


def energy_distance(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """The energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between two sets of points (0 iff equal in law)."""
    x = samples.reshape(samples.shape[0], -1).double()
    y = reference.reshape(reference.shape[0], -1).double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
