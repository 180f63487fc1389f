"""Network wrappers that feed named conditioning to a network: channel concatenation and coordinate channels.

Wrappers keep the network call convention ``net(x, timesteps=t, **cond)`` so they stack and slot under any
denoiser adapter. They are plain callables (not ``nn.Module``) so the wrapped network's ``state_dict`` is unchanged.
Conditioning travels by name, never by slicing channels at magic offsets:

>>> net_in = ConcatConditioning(unet, keys="concat")            # image (3 ch) + covariates (4 ch) -> 7 input channels
>>> denoiser = EpsilonDenoiser(net_in, schedule)
>>> denoiser(x_t, t, concat=covariates, context=context)           # context= reaches the U-Net's cross-attention
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from meddiff3d.errors import InputError

from .tensor_utils import append_dims

__all__ = ["broadcast_channels", "ConcatConditioning", "CoordinateChannels", "AppendCoordinates"]


def broadcast_channels(c: torch.Tensor, x: torch.Tensor, name: str = "conditioning") -> torch.Tensor:
    """Conditioning ``(B, Cc, *spatial)`` as is, or a vector ``(B, Cc)`` broadcast over ``x``'s spatial dims."""
    if c.ndim == 2:
        c = append_dims(c, x.ndim).expand(*c.shape, *x.shape[2:])
    if c.ndim != x.ndim or c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
        raise InputError(
            f"{name} of shape {tuple(c.shape)} cannot be concatenated to x of shape {tuple(x.shape)}: "
            "expected (B, C) or (B, C, *spatial) with the same batch size and spatial shape"
        )
    return c.to(x.dtype)


class ConcatConditioning:
    """Concatenate the named conditioning tensors to ``x`` along channels, in the order of ``keys``.

    ``ConcatConditioning(net, "concat")(x, timesteps=t, concat=c, context=ctx)`` calls
    ``net(cat([x, c], 1), timesteps=t, context=ctx)``; other keywords pass through unchanged.
    """

    def __init__(self, net: Callable[..., torch.Tensor], keys: str | Sequence[str] = "concat") -> None:
        self.net = net
        self.keys = (keys,) if isinstance(keys, str) else tuple(keys)

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **cond: Any) -> torch.Tensor:
        missing = [k for k in self.keys if k not in cond]
        if missing:
            raise InputError(f"ConcatConditioning: conditioning {missing} not given (got {sorted(cond)})")
        parts = [x] + [broadcast_channels(cond.pop(k), x, name=k) for k in self.keys]
        return self.net(torch.cat(parts, dim=1), timesteps=timesteps, **cond)


class CoordinateChannels:
    """Coordinate channels ``linspace(-1, 1)`` per spatial axis of a full volume (PatchDDM).

    Args:
        full_shape: spatial shape of the whole volume. A patch at ``offset`` gets the coordinates of its true
            position, i.e. exactly the crop of the full volume's coordinates. ``None``: each input is the full volume.

    ``num_channels`` (= number of spatial dims, or ``spatial_dims`` when ``full_shape`` is None) is what a network
    needs added to its ``in_channels``.
    """

    def __init__(self, full_shape: Sequence[int] | None = None, spatial_dims: int = 3) -> None:
        self.full_shape = None if full_shape is None else tuple(int(n) for n in full_shape)
        self.num_channels = len(self.full_shape) if self.full_shape is not None else int(spatial_dims)

    def __call__(self, shape: Sequence[int], offset: Sequence[int] | torch.Tensor | None = None, batch_size: int = 1,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Coordinates ``(B, D, *shape)`` of a patch of spatial ``shape`` at ``offset`` (``(D,)`` or ``(B, D)``)."""
        shape = tuple(int(n) for n in shape)
        full = self.full_shape if self.full_shape is not None else shape
        if len(shape) != self.num_channels or len(full) != len(shape):
            raise InputError(f"patch shape {shape} does not match the {self.num_channels}-D coordinates of {full}")
        off = torch.zeros(len(shape)) if offset is None else torch.as_tensor(offset, dtype=torch.float64)
        off = off.reshape(-1, len(shape)).to(device=device, dtype=torch.float64).expand(batch_size, -1)
        if bool(((off < 0) | (off + torch.tensor(shape, device=device) > torch.tensor(full, device=device))).any()):
            raise InputError(f"patch of shape {shape} at offset {off.tolist()} lies outside the volume {full}")
        channels = []
        for axis, (n, n_full) in enumerate(zip(shape, full)):
            index = off[:, axis : axis + 1] + torch.arange(n, device=device, dtype=torch.float64)  # (B, n)
            coord = -1.0 + 2.0 * index / max(n_full - 1, 1)
            view = [batch_size] + [1] * len(shape)
            view[1 + axis] = n
            channels.append(coord.reshape(view).expand(batch_size, *shape))
        return torch.stack(channels, dim=1).to(dtype)


class AppendCoordinates:
    """Append :class:`CoordinateChannels` to ``x`` before calling the network.

    The patch position comes by name: ``offset_key`` (default ``"patch_offset"``, ``(D,)`` or ``(B, D)`` voxels);
    absent means offset 0 (the full volume, or a volume whose coordinates are its own).
    """

    def __init__(self, net: Callable[..., torch.Tensor], coordinates: CoordinateChannels,
                 offset_key: str = "patch_offset") -> None:
        self.net, self.coordinates, self.offset_key = net, coordinates, offset_key

    @property
    def num_channels(self) -> int:
        return self.coordinates.num_channels

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **cond: Any) -> torch.Tensor:
        offset = cond.pop(self.offset_key, None)
        coords = self.coordinates(x.shape[2:], offset, x.shape[0], x.device, x.dtype)
        return self.net(torch.cat([x, coords], dim=1), timesteps=timesteps, **cond)
