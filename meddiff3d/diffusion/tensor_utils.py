"""Small tensor helpers shared by the diffusion modules: N-dimensional broadcasting and explicit randomness."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["append_dims", "as_generator", "randn", "rand", "batch_timesteps"]


def append_dims(x: torch.Tensor, target_ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions to ``x`` until it has ``target_ndim`` dimensions.

    A per-sample coefficient of shape ``(B,)`` becomes ``(B, 1, 1)`` for 2D images and ``(B, 1, 1, 1)`` for 3D
    volumes, so it broadcasts against ``(B, C, *spatial)`` whatever the number of spatial dimensions.
    """
    missing = target_ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {target_ndim}")
    return x[(...,) + (None,) * missing]


def as_generator(generator: torch.Generator | int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Turn a seed into a ``torch.Generator`` (on ``device``); pass a generator or ``None`` (global RNG) through."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    seeded = torch.Generator(device=device)
    seeded.manual_seed(int(generator))
    return seeded


def _draw(fn, shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move next to ``like``.
    device = generator.device if generator is not None else like.device
    out = fn(tuple(shape), generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` with the dtype and device of ``like``; ``generator=None`` uses the global RNG."""
    return _draw(torch.randn, shape, generator, like)


def rand(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) samples of ``shape`` with the dtype and device of ``like``."""
    return _draw(torch.rand, shape, generator, like)


def batch_timesteps(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """A timestep (scalar or ``(B,)``) as a float tensor of shape ``(B,)`` on ``x``'s device, as networks expect."""
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t
