"""Exact slab-wise convolutions over :class:`~meddiff3d.models.slabs.Slabs`, and the pass that runs them.

:func:`conv_pass` computes a convolution's output slab by slab from a window of its input (the slab plus its halo,
:func:`~meddiff3d.models.slabs.gather`), with a prologue on that window (GroupNorm's affine from whole-volume
statistics, then an activation), an activation of its output, a residual added in place into the residual's chunk,
and the statistics of its output accumulated for the next GroupNorm. Input chunks are freed as soon as no later
window needs them, so at any time only the activations a one-pass forward would need at that point are held, as
slabs, plus one window.

Three convolution kinds (the ``op`` of a pass): :class:`SlabConv` (any stride, symmetric zero padding),
:class:`SlabConvTranspose` and :class:`NearestUpConv` (nearest x2 upsampling then a 3-wide stride-1 convolution,
computed without the upsampled tensor as one stride-2 transposed convolution: 8/27 of the multiply-adds, the same
products). Everything is float arithmetic on the same values a one-pass forward sees; only the order of additions
differs (and, for the upsampling convolution, the 3-tap weights summed into 2 taps in float64). On the CPU every
convolution runs in oneDNN, a residual inside the convolution (its sum post-op).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meddiff3d.models.slabs import CL, WINDOW_BYTES, ChannelStats, Prologue, Slabs, gather, plan_bounds

#: add a residual inside oneDNN's convolution (its sum post-op) rather than with a separate addition
FUSED_SUM = True


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding) -> torch.Tensor:
    """``F.conv3d`` (groups 1), on the CPU always by oneDNN: ATen would pick its im2col kernel for small float32
    windows, whose column buffer is 27 times the window."""
    if _onednn(x):
        stride = tuple(stride) if isinstance(stride, (tuple, list)) else (stride,) * 3
        x = x.contiguous(memory_format=CL)  # the layout of the weight (a mismatch is not converted here)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(padding), list(stride), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)


def conv_transpose3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     output_padding) -> torch.Tensor:
    """``F.conv_transpose3d`` (groups 1), on the CPU always by oneDNN (ATen's fallback for small float32 inputs
    builds a column buffer of kernel-volume times the output)."""
    if _onednn(x) and hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise"):
        return torch.ops.mkldnn._convolution_transpose_pointwise(
            x.contiguous(memory_format=CL), weight, bias, list(padding), list(output_padding), list(stride), [1, 1, 1],
            1, "none", [], "")
    return F.conv_transpose3d(x, weight, bias, stride, padding, output_padding)


def _onednn(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and x.dtype in (torch.float32, torch.bfloat16))


def _fused_sum_available(into: torch.Tensor, x: torch.Tensor) -> bool:
    return (FUSED_SUM and _onednn(x) and into.dtype == x.dtype and into.is_contiguous(memory_format=CL)
            and x.is_contiguous(memory_format=CL) and hasattr(torch.ops.mkldnn, "_convolution_pointwise_"))


def _for_compute(t: torch.Tensor | None, dtype: torch.dtype, weight: bool = False) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.detach().to(dtype)
    return t.contiguous(memory_format=CL) if weight and t.ndim == 5 else t.contiguous()


class SlabConv:
    """A 3D convolution (groups 1, dilation 1, zero padding ``p`` on both sides, any stride) by output slabs."""

    def __init__(self, conv: nn.Conv3d, dtype: torch.dtype) -> None:
        self.k, self.s, self.pad, self.dtype = conv.kernel_size, conv.stride, conv.padding, dtype
        self.weight, self.bias = _for_compute(conv.weight, dtype, True), _for_compute(conv.bias, dtype)
        self.out_channels = conv.out_channels

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (type(conv) is nn.Conv3d and conv.groups == 1 and conv.dilation == (1, 1, 1)
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    def out_depth(self, depth: int) -> int:
        return (depth + 2 * self.pad[0] - self.k[0]) // self.s[0] + 1

    def window(self, a: int, b: int) -> tuple[int, int]:
        return a * self.s[0] - self.pad[0], (b - 1) * self.s[0] - self.pad[0] + self.k[0]

    def __call__(self, src: Slabs, a: int, b: int, prologue: Prologue | None,
                 into: torch.Tensor | None = None) -> torch.Tensor:
        """Output planes ``[a, b)``; ``into``: a tensor of their shape the result is added to in place (oneDNN's sum
        post-op where available: one rounding, no extra pass)."""
        x = gather(src, *self.window(a, b), prologue, self.dtype)
        padding = (0, *self.pad[1:])
        if into is None:
            return conv3d(x, self.weight, self.bias, self.s, padding)
        if _fused_sum_available(into, x):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                into, x, self.weight, self.bias, list(padding), list(self.s), [1, 1, 1], 1, "add", None, None, [], None)
        return into.add_(conv3d(x, self.weight, self.bias, self.s, padding))


class SlabConvTranspose:
    """A transposed 3D convolution (groups 1, dilation 1, ``kernel >= stride``) by output slabs: output plane ``o``
    receives input planes ``i`` with ``o = i * stride - padding + t``, ``0 <= t < kernel``; each slab's window is cut
    to exactly its planes by the convolution's own padding (no output outside the slab is computed)."""

    def __init__(self, conv: nn.ConvTranspose3d, dtype: torch.dtype) -> None:
        self.setup(conv.weight, conv.bias, conv.stride, conv.padding, conv.output_padding, dtype)

    def setup(self, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, output_padding,
              dtype: torch.dtype) -> None:
        self.k, self.s, self.p, self.op = tuple(weight.shape[2:]), tuple(stride), tuple(padding), tuple(output_padding)
        self.weight, self.bias, self.dtype = _for_compute(weight, dtype, True), _for_compute(bias, dtype), dtype
        self.out_channels = weight.shape[1]

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (type(conv) is nn.ConvTranspose3d and conv.groups == 1 and conv.dilation == (1, 1, 1)
                and conv.padding_mode == "zeros" and all(k >= s for k, s in zip(conv.kernel_size, conv.stride)))

    def out_depth(self, depth: int) -> int:
        return (depth - 1) * self.s[0] - 2 * self.p[0] + self.k[0] + self.op[0]

    def window(self, a: int, b: int) -> tuple[int, int]:
        return -(-(a + self.p[0] - self.k[0] + 1) // self.s[0]), (b - 1 + self.p[0]) // self.s[0] + 1

    def __call__(self, src: Slabs, a: int, b: int, prologue: Prologue | None) -> torch.Tensor:
        lo, hi = self.window(a, b)  # zeros outside the input contribute nothing, as in one pass
        first = lo * self.s[0] - self.p[0]  # the global plane of the window's first output plane
        front, back = a - first, (hi - lo - 1) * self.s[0] + self.k[0] + first - b
        crop = min(front, back)
        y = conv_transpose3d(gather(src, lo, hi, prologue, self.dtype), self.weight, self.bias, self.s,
                             (crop, *self.p[1:]), (0, *self.op[1:]))
        if y.shape[2] != b - a:  # a copy, not a view holding the whole window's output
            return y[:, :, front - crop : front - crop + b - a].clone(memory_format=CL)
        return y.contiguous(memory_format=CL)


class NearestUpConv(SlabConvTranspose):
    """``conv(nearest_upsample_x2(x))`` for a 3-wide, stride-1, padding-1 convolution, without the upsampled tensor:
    a stride-2 transposed convolution (kernel 4, padding 1) whose taps along each axis are
    ``(w2, w1 + w2, w0 + w1, w0)``. Each output sees 2 input planes per axis: 8/27 of the multiply-adds, the same
    products summed (the tap sums made in float64)."""

    #: the transposed kernel's 4 taps along an axis as sums of the 3 taps of the convolution
    TAPS = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))

    def __init__(self, conv: nn.Conv3d, dtype: torch.dtype) -> None:
        w = conv.weight.detach().double()
        taps = torch.tensor(self.TAPS, dtype=torch.float64, device=w.device)
        for dim in (2, 3, 4):
            w = (w.movedim(dim, -1) @ taps.T).movedim(-1, dim)
        w = w.transpose(0, 1)
        self.setup(w, conv.bias, (2, 2, 2), (1, 1, 1), (0, 0, 0), dtype)

    @staticmethod
    def supports(conv: nn.Module) -> bool:
        return (SlabConv.supports(conv) and conv.kernel_size == (3, 3, 3) and conv.stride == (1, 1, 1)
                and conv.padding == (1, 1, 1))


def conv_pass(src: Slabs, op, *, prologue: Prologue | None = None, act: Callable | None = None,
              residual: Slabs | None = None, residual_act: Callable | None = None,
              side: SlabConv | None = None, release: bool = True, stats: bool = False,
              bounds: list[tuple[int, int]] | None = None,
              window_bytes: int = WINDOW_BYTES) -> tuple[Slabs, Slabs | None]:
    """``residual_act(residual + act(op(prologue(src))))`` slab by slab (each part optional; the sum is made in
    the residual's chunk, which the output takes over). ``side``: a 1x1 convolution of the raw input, returned as
    the second result (a ResBlock's shortcut). ``release``: free input chunks once no later window needs them.
    ``stats``: accumulate the output's :class:`ChannelStats`. Output slabs follow the residual's, else the input's
    when the depth is kept, else hold about ``window_bytes`` each."""
    depth = op.out_depth(src.depth)
    if bounds is None:
        bounds = residual.bounds() if residual is not None else src.bounds() if depth == src.depth else None
    if bounds is None:  # about window_bytes of output and input window per slab (planes scale alike on all axes)
        first, scale = src.first, depth / src.depth
        hw_in = first[0, 0, 0].numel()
        plane = (op.out_channels * hw_in * scale**2 + first.shape[1] * hw_in / scale) * torch.finfo(op.dtype).bits // 8
        stride = op.s[0] if isinstance(op, SlabConvTranspose) else 1  # even slabs: no cropped output to copy
        bounds = plan_bounds(depth, max(int(plane), 1), window_bytes, stride)
    out, side_out = Slabs(depth), (Slabs(depth) if side is not None else None)
    if stats:
        out.stats = ChannelStats(op.out_channels, src.first.device)
    fuse = residual is not None and act is None and isinstance(op, SlabConv)
    for k, (a, b) in enumerate(bounds):
        if side is not None:
            side_out.append(side(src, a, b, None))
        if fuse:
            y = op(src, a, b, prologue, into=residual.chunks[k])
        else:
            y = op(src, a, b, prologue)
        if act is not None:
            y = act(y)
        if residual is not None:
            y = y if fuse else residual.chunks[k].add_(y)
            residual.chunks[k] = None
            if residual_act is not None:
                y = residual_act(y)
        out.append(y)
        if stats:
            out.stats.add(y)
        if release:
            src.release_before(op.window(*bounds[k + 1])[0] if k + 1 < len(bounds) else src.depth)
    return out, side_out
