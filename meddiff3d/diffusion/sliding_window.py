"""A network wrapper that runs the network window by window: bounded memory for large volumes (PatchDDM fallback).

:class:`SlidingWindowNetwork` keeps the network call convention ``net(x, timesteps=t, **cond)`` and evaluates it with
MONAI's sliding-window inference (``monai.inferers.SlidingWindowInferer``: overlapping windows, Gaussian blending).
Each window is passed its position by name -- ``patch_offset`` ``(n, D)``, the window's low corner in voxels of the
whole input, added to any offset the whole input already had -- so a network under
:class:`~meddiff3d.diffusion.AppendCoordinates` sees the coordinates of each window's true position. Conditioning
tensors with ``x``'s spatial shape are cut like ``x``; per-sample tensors (first dim = batch) follow their sample;
anything else passes unchanged. Stack it *under* channel concatenation and *above* the coordinates::

    ConcatConditioning(SlidingWindowNetwork(AppendCoordinates(net, coords), roi_size=(64, 64, 64)), "image")

A fully convolutional network gives nearly the whole-volume result; the difference comes from the network's
receptive field at window borders and from GroupNorm statistics computed per window.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from meddiff3d.errors import InputError

__all__ = ["SlidingWindowNetwork"]


class SlidingWindowNetwork:
    """Evaluate ``net`` on overlapping windows of ``roi_size`` and blend them (MONAI ``SlidingWindowInferer``).

    Args:
        net: called as ``net(window, timesteps=t, patch_offset=corner, **cond)``.
        roi_size: window size; clamped to the input's size per axis (MONAI would pad smaller inputs, which would
            shift the windows' positions).
        overlap: fraction of overlap between neighbouring windows (MONAI's ``overlap``).
        sw_batch_size: windows evaluated together.
        mode: blending, ``"gaussian"`` (default) or ``"constant"``.
        sigma_scale: width of the Gaussian weight, as a fraction of the window size.
        offset_key: name of the position keyword.
    """

    def __init__(self, net: Callable[..., torch.Tensor], roi_size: Sequence[int], overlap: float = 0.25,
                 sw_batch_size: int = 1, mode: str = "gaussian", sigma_scale: float = 0.125,
                 offset_key: str = "patch_offset") -> None:
        if not 0.0 <= float(overlap) < 1.0:
            raise InputError(f"sliding-window overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise InputError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if mode not in ("gaussian", "constant"):
            raise InputError(f"sliding-window mode must be 'gaussian' or 'constant', got {mode!r}")
        self.net, self.roi_size = net, tuple(int(s) for s in roi_size)
        self.overlap, self.sw_batch_size, self.mode = float(overlap), int(sw_batch_size), mode
        self.sigma_scale, self.offset_key = float(sigma_scale), offset_key

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, **cond: Any) -> torch.Tensor:
        from monai.inferers import SlidingWindowInferer

        spatial = tuple(x.shape[2:])
        if len(self.roi_size) != len(spatial):
            raise InputError(f"sliding-window roi_size {self.roi_size} does not match the {len(spatial)}-D input")
        roi = tuple(min(r, s) for r, s in zip(self.roi_size, spatial))
        batch = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(batch) if t.ndim == 0 else t
        base = cond.pop(self.offset_key, None)
        base = torch.zeros(batch, len(spatial), dtype=torch.int64) if base is None else \
            torch.as_tensor(base).reshape(-1, len(spatial)).expand(batch, -1).to(torch.int64).cpu()

        def window_call(windows: torch.Tensor, locations: list) -> torch.Tensor:
            samples = [int(loc[0].start) for loc in locations]
            corners = torch.tensor([[int(s.start) for s in loc[2:]] for loc in locations], dtype=torch.int64)
            kwargs = {name: self._cut(value, samples, locations, spatial, batch) for name, value in cond.items()}
            return self.net(windows, timesteps=t[samples], **{self.offset_key: corners + base[samples]}, **kwargs)

        inferer = SlidingWindowInferer(roi, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode=self.mode,
                                       sigma_scale=self.sigma_scale, with_coord=True)
        return inferer(x, window_call)

    @staticmethod
    def _cut(value: Any, samples: list[int], locations: list, spatial: tuple, batch: int) -> Any:
        if not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
            return value
        if tuple(value.shape[2:]) == spatial:
            return torch.cat([value[(slice(s, s + 1), slice(None), *loc[2:])] for s, loc in zip(samples, locations)])
        return value[samples]

    def __repr__(self) -> str:
        return (f"SlidingWindowNetwork(roi_size={self.roi_size}, overlap={self.overlap}, "
                f"sw_batch_size={self.sw_batch_size}, mode={self.mode!r})")
