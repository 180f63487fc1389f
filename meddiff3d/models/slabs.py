"""Tensors held as slabs along the first spatial axis: storage, whole-volume statistics and convolution windows.

The data side of :mod:`meddiff3d.models.streamed_decode` (the convolutions over it: :mod:`meddiff3d.models.slab_convs`).
A :class:`Slabs` holds one ``(1, C, D, H, W)`` activation as channels-last chunks of planes along ``D``, freed chunk by
chunk once consumed; :class:`ChannelStats` accumulates its per-channel statistics slab by slab, from which any
GroupNorm over the whole tensor gets its affine; :func:`gather` builds a convolution's input window (a slab plus its
halo, zeros outside the volume) with a pointwise prologue applied (that affine, then an activation).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

import torch
from torch import nn

CL = torch.channels_last_3d
#: bytes of one slab's output and input window (compute dtype). Larger slabs: fewer, more efficient calls, more memory;
#: measured on the anchor autoencoder (160x224x160, bf16, 2 threads): 64 MB 26.8 s / 2.15 GB peak RSS, 128 MB
#: 24.7 s / 2.34 GB, 192 MB 23.0 s / 2.48 GB, 256 MB 22.2 s / 2.65 GB
WINDOW_BYTES = 192 * 2**20
#: elements per block when a prologue (norm + activation) is applied to a window: few large operations (many small
#: ones cost a thread wake-up each, which on a loaded machine outweighs what cache-sized blocks gain)
PROLOGUE_ELEMENTS = 2**24

Prologue = tuple  # (scale (C,) float32 or None, shift (C,) or None, in-place activation or None)


class ChannelStats:
    """Per-channel count, mean and sum of squared deviations (float64), merged slab by slab (Chan et al.'s pairwise
    update), so that any GroupNorm over the tensor gets its whole-volume statistics without the whole tensor."""

    def __init__(self, channels: int, device: torch.device | str = "cpu") -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(channels, dtype=torch.float64, device=device)
        self._running: tuple[torch.Tensor, torch.Tensor] | None = None

    def add(self, chunk: torch.Tensor) -> None:
        """Merge the statistics of ``chunk`` ``(1, C, ...)``: per-chunk mean and variance by ATen's batch-norm
        statistics kernel (two passes, float32 accumulation even for bfloat16 input), merged in float64."""
        channels = chunk.shape[1]
        if chunk.is_meta:  # shapes only (counting operations): no values to accumulate
            self.count += chunk.numel() // channels
            return
        if self._running is None:  # batch_norm_update_stats wants running statistics; momentum 0 leaves them as is
            self._running = torch.zeros(channels, device=chunk.device), torch.ones(channels, device=chunk.device)
        mean, var = torch.batch_norm_update_stats(chunk, *self._running, 0.0)
        n, mean = chunk.numel() // channels, mean.double()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += var.double() * n + delta.pow(2) * (self.count * n / total)
        self.count = total

    def group_norm_affine(self, norm: nn.GroupNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` with ``norm(x) == x * scale[c] + shift[c]`` over the whole tensor, ``(C,)`` float32."""
        groups, channels = norm.num_groups, self.mean.numel()
        per = channels // groups
        mean_c, var_c = self.mean.view(groups, per), (self.m2 / self.count).view(groups, per)
        mean_g = mean_c.mean(1, keepdim=True)
        var_g = (var_c + (mean_c - mean_g).pow(2)).mean(1, keepdim=True)
        scale = (var_g + norm.eps).rsqrt().expand(groups, per).reshape(channels)
        shift = -mean_g.expand(groups, per).reshape(channels) * scale
        if norm.affine:
            w, b = norm.weight.detach().double(), norm.bias.detach().double()
            scale, shift = scale * w.to(scale.device), shift * w.to(scale.device) + b.to(scale.device)
        return scale.float(), shift.float()


class Slabs:
    """A ``(1, C, D, H, W)`` tensor as chunks of planes along ``D`` (each channels-last); chunks are dropped with
    :meth:`release_before` once consumed. ``stats``: its :class:`ChannelStats` when a GroupNorm will read it."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.chunks: list[torch.Tensor | None] = []
        self.starts: list[int] = []
        self.stats: ChannelStats | None = None

    @classmethod
    def of(cls, x: torch.Tensor, bounds: list[tuple[int, int]] | None = None) -> "Slabs":
        slabs = cls(x.shape[2])
        for a, b in bounds or [(0, x.shape[2])]:
            slabs.append(x[:, :, a:b].contiguous(memory_format=CL))
        return slabs

    def append(self, chunk: torch.Tensor) -> None:
        self.starts.append(self.starts[-1] + self.chunks[-1].shape[2] if self.chunks else 0)
        self.chunks.append(chunk)

    def bounds(self) -> list[tuple[int, int]]:
        return [(s, s + c.shape[2]) for s, c in zip(self.starts, self.chunks)]

    @property
    def first(self) -> torch.Tensor:
        return next(c for c in self.chunks if c is not None)

    def pieces(self, lo: int, hi: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(plane, view)`` for the planes of ``[lo, hi)`` inside the volume, in order."""
        for start, end, chunk in zip(self.starts, self.starts[1:] + [self.depth], self.chunks):
            a, b = max(lo, start), min(hi, end)
            if a >= b:
                continue
            if chunk is None:
                raise RuntimeError(f"planes {start}-{end} were released but are needed again")
            yield a, chunk[:, :, a - start : b - start]

    def release_before(self, plane: int) -> None:
        for i, (start, chunk) in enumerate(zip(self.starts, self.chunks)):
            if chunk is not None and start + chunk.shape[2] <= plane:
                self.chunks[i] = None

    def whole(self, release: bool = True) -> torch.Tensor:
        out = torch.cat([c for c in self.chunks if c is not None], dim=2).contiguous(memory_format=CL)
        if release:
            self.chunks = [None] * len(self.chunks)
        return out


_scratch = threading.local()


@contextlib.contextmanager
def scratch_space() -> Iterator[None]:
    """Within the context, :func:`gather` builds its windows in one reused buffer per dtype instead of fresh memory:
    a fresh window's first write costs a page fault per page (about as long as computing it)."""
    previous = getattr(_scratch, "buffers", None)
    _scratch.buffers = {}
    try:
        yield
    finally:
        _scratch.buffers = previous


def _window_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised channels-last ``(N, C, D, H, W)`` tensor, a view of the scratch buffer when one is open."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device, memory_format=CL)
    n, c, d, h, w = shape
    key = (dtype, str(device))
    flat = buffers.get(key)
    if flat is None or flat.numel() < n * c * d * h * w:
        buffers[key] = None  # free the smaller one first
        flat = buffers[key] = torch.empty(n * c * d * h * w, dtype=dtype, device=device)
    return flat[: n * c * d * h * w].view(n, d, h, w, c).permute(0, 4, 1, 2, 3)


def plan_bounds(depth: int, plane_bytes: int, window_bytes: int = WINDOW_BYTES,
                multiple: int = 1) -> list[tuple[int, int]]:
    """Slabs of ``depth`` planes of about ``window_bytes`` each, their boundaries on multiples of ``multiple``."""
    step = max(1, window_bytes // max(1, plane_bytes) // multiple) * multiple
    return [(a, min(a + step, depth)) for a in range(0, depth, step)]


def gather(src: Slabs, lo: int, hi: int, prologue: Prologue | None, dtype: torch.dtype) -> torch.Tensor:
    """Planes ``[lo, hi)`` of ``src`` (zeros outside ``[0, depth)``) with the prologue applied, as one channels-last
    tensor of ``dtype``.

    The prologue's affine runs as ATen's inference batch norm with ``scale``/``shift`` as weight and bias (mean 0,
    variance 1, eps 0: exactly ``x * scale + shift``, computed in float32) written straight into the window, the
    activation in place on it, at most :data:`PROLOGUE_ELEMENTS` at a time."""
    first = src.first
    n, c, rest = first.shape[0], first.shape[1], list(first.shape[3:])
    if prologue is None and first.dtype == dtype:
        parts = list(src.pieces(lo, hi))
        if len(parts) == 1 and parts[0][0] == lo and parts[0][1].shape[2] == hi - lo:
            return parts[0][1]  # the window is one stored slab: no copy
    out = _window_tensor((n, c, hi - lo, *rest), dtype, first.device)
    inside = max(lo, 0) - lo, min(hi, src.depth) - lo
    if inside[0] > 0:
        out[:, :, : inside[0]].zero_()
    if inside[1] < hi - lo:
        out[:, :, max(inside[1], 0) :].zero_()
    scale, shift, act = prologue if prologue is not None else (None, None, None)
    plane_elements = c * rest[0] * rest[1]
    planes = max(1, PROLOGUE_ELEMENTS // plane_elements)
    rows = rest[0] if planes > 1 else max(1, min(rest[0], PROLOGUE_ELEMENTS // max(1, c * rest[1])))
    for plane, piece in src.pieces(lo, hi):
        if scale is None and act is None:
            out[:, :, plane - lo : plane - lo + piece.shape[2]].copy_(piece)
            continue
        for d in range(0, piece.shape[2], planes):
            for r in range(0, rest[0], rows):
                part = piece[:, :, d : d + planes, r : r + rows]
                dst = out[:, :, plane - lo + d : plane - lo + d + part.shape[2], r : r + rows]
                _affine_into(part, scale, shift, dst)
                if act is not None:
                    act(dst)
    return out


@functools.lru_cache(maxsize=64)
def _constants(channels: int, device: str, which: str) -> torch.Tensor:
    """Read-only per-channel zeros / ones (the running statistics of ATen's inference batch norm)."""
    return (torch.zeros if which == "zeros" else torch.ones)(channels, device=device)


def _affine_into(part: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None,
                 dst: torch.Tensor) -> None:
    if scale is None:
        dst.copy_(part)
    elif part.dtype == dst.dtype and dst.is_contiguous(memory_format=CL):
        c, dev = part.shape[1], str(part.device)
        unused = torch.empty(0, device=part.device), torch.empty(0, device=part.device)  # resized when written
        mean, var = _constants(c, dev, "zeros"), _constants(c, dev, "ones")
        torch.ops.aten.native_batch_norm.out(part, scale, shift, mean, var, False, 0.0, 0.0, out=dst,
                                             save_mean=unused[0], save_invstd=unused[1])
    else:
        dst.copy_(torch.addcmul(shift.view(1, -1, 1, 1, 1), part.to(dst.dtype), scale.view(1, -1, 1, 1, 1)))
