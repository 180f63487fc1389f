"""Exact, memory-bounded decoding: a MONAI autoencoder's decoder run block by block over slabs.

:func:`streamed_decode` equals ``autoencoder.decode_stage_2_outputs(latent)`` (same float operations on the same
values up to the order of additions; GroupNorm with whole-volume statistics) while holding every activation in the
compute dtype as slabs along the first spatial axis (:mod:`meddiff3d.models.slabs`), freed as soon as its consumer has
run (the convolutions: :mod:`meddiff3d.models.slab_convs`). Each block becomes one or two slab-wise convolution passes with the pointwise work fused around them:

* ``AEKLResBlock``: pass 1 ``h = conv1(silu(norm1(x)))`` (plus the 1x1 shortcut of ``x``, after which ``x``'s slabs
  are freed), pass 2 ``out = shortcut + conv2(silu(norm2(h)))`` summed in place into the shortcut's slabs; each
  GroupNorm's statistics were accumulated by the pass that produced its input (float64, per channel);
* ``UpSample`` (nearest x2 then a 3x3x3 convolution): :class:`~meddiff3d.models.slab_convs.NearestUpConv`, which never
  makes the upsampled tensor and does 8/27 of the multiply-adds; ``deconv`` mode and VQ-VAE upsampling:
  slab-wise transposed convolutions;
* a GroupNorm followed by a convolution (the decoder's head) becomes that convolution's prologue;
* ``VQVAEResidualUnit``: ``relu(x + conv2(relu(conv1(x))))`` in two passes; activations and dropout (eval) slab by
  slab; any other block (e.g. attention at the latent resolution) runs on the whole tensor, as in one pass.

Peak memory is the largest activation (anchor autoencoder: 128 channels at 160x224x160, 1.47 GB in bf16) plus one
slab's window and output (:data:`~meddiff3d.models.slabs.WINDOW_BYTES`), instead of several such activations and
their GroupNorm temporaries. Batches are decoded one item at a time (GroupNorm is per sample, so this is exact too).
Measured on the anchor autoencoder (MONAI model-zoo brain LDM, random weights, latent 3x20x28x20, 2 threads of a
shared 2-core machine at load ~2.8, ``scripts/bench_brain_ldm.py``; max / mean |diff| from the one-pass float32
decode, image std 0.52):

==================  ========  ===========  ==================
decode              seconds   peak RSS     vs one-pass fp32
==================  ========  ===========  ==================
one pass, fp32      122.5     10.4 GB      0
one pass, bf16      24.8      4.9 GB       0.095 / 0.0085
split=4, bf16       70.3      7.6 GB       0.082 / 0.0076
tiled, bf16         22.8      1.5 GB       2.07 / 0.14
streamed, bf16      22.1      2.5 GB       0.093 / 0.0082
streamed, fp32      78.3      3.9 GB       7.8e-5 / 8.1e-6
==================  ========  ===========  ==================

Mixed precision follows the caller's autocast: with bf16 autocast the activations are stored and convolved in bf16
(the one-pass forward's own convolution outputs), each GroupNorm's affine computed in float32 and rounded to bf16
(as ATen's GroupNorm does for bf16 input under CPU autocast), the activation on that; without autocast everything is
float32.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from meddiff3d.models.slab_convs import NearestUpConv, SlabConv, SlabConvTranspose, conv_pass
from meddiff3d.models.slabs import CL, WINDOW_BYTES, ChannelStats, Slabs, scratch_space

__all__ = ["streamed_decode", "can_stream"]

#: convolution -> its slab-wise form with weights in the compute dtype and layout (dropped with the module)
_PREPARED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()

#: modules applied slab by slab as they are (pointwise in eval mode)
POINTWISE = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.SiLU, nn.GELU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Mish,
             nn.Identity, nn.Dropout, nn.Dropout3d)


def _monai_classes() -> dict[str, type]:
    from monai.networks.blocks import Convolution, UpSample
    from monai.networks.nets.autoencoderkl import AEKLResBlock
    from monai.networks.nets.vqvae import VQVAEResidualUnit

    return {"conv": Convolution, "up": UpSample, "res": AEKLResBlock, "vqres": VQVAEResidualUnit}


def can_stream(autoencoder: nn.Module) -> bool:
    """Whether :func:`streamed_decode` applies: a MONAI ``AutoencoderKL`` or ``VQVAE`` with a 3D decoder."""
    decoder = getattr(autoencoder, "decoder", None)
    has_input = hasattr(autoencoder, "post_quant_conv") or hasattr(autoencoder, "quantize")
    return has_input and isinstance(getattr(decoder, "blocks", None), nn.ModuleList) and len(decoder.blocks) > 0 \
        and getattr(decoder, "spatial_dims", 3) == 3


def _pointwise(module: nn.Module) -> bool:
    return isinstance(module, POINTWISE) or (
        isinstance(module, nn.Sequential) and all(_pointwise(m) for m in module.children()))


def _same(conv: nn.Module) -> bool:
    """A stride-1 convolution keeping the size (so that a residual can be added slab by slab)."""
    return isinstance(conv, nn.Conv3d) and conv.stride == (1, 1, 1) and all(
        2 * p == k - 1 for p, k in zip(conv.padding, conv.kernel_size))


def _conv_parts(block: nn.Module, classes: dict[str, type]) -> tuple[nn.Module, nn.Module | None] | None:
    """``(conv, activation or None)`` of a MONAI ``Convolution`` whose ADN is pointwise, else ``None``."""
    if type(block) is not classes["conv"]:
        return None
    names = [n for n, _ in block.named_children()]
    if names not in (["conv"], ["conv", "adn"]):
        return None
    adn = getattr(block, "adn", None)
    if adn is not None and not all(_pointwise(m) for m in adn.children()):
        return None
    if SlabConv.supports(block.conv) or SlabConvTranspose.supports(block.conv):
        return block.conv, adn
    return None


class _Walker:
    """Runs the decoder's blocks over :class:`Slabs`; ``pending`` is a GroupNorm folded into the next convolution."""

    def __init__(self, dtype: torch.dtype, autocast: tuple[str, torch.dtype, bool], window_bytes: int) -> None:
        self.dtype, self.autocast, self.classes = dtype, autocast, _monai_classes()
        self.window_bytes = window_bytes

    def op(self, kind: type, conv: nn.Module):
        """The slab-wise form of ``conv``, its weights prepared once per module, dtype and weight version."""
        prepared = _PREPARED.setdefault(conv, {})
        key = (kind, self.dtype, conv.weight._version, conv.weight.data_ptr())
        if key not in prepared:
            prepared.clear()
            prepared[key] = kind(conv, self.dtype)
        return prepared[key]

    def conv(self, *args, **kwargs) -> tuple[Slabs, Slabs | None]:
        return conv_pass(*args, window_bytes=self.window_bytes, **kwargs)

    def prologue(self, x: Slabs, norm: nn.GroupNorm, act: Callable | None) -> tuple:
        if x.stats is None:
            raise RuntimeError("a GroupNorm's input has no statistics (streamed decode bookkeeping)")
        return (*x.stats.group_norm_affine(norm), act)

    def materialise(self, x: Slabs, pending: tuple | None) -> Slabs:
        """``x`` with a pending GroupNorm applied (and its own statistics), when no convolution takes it over."""
        if pending is None:
            return x
        scale, shift, _ = pending
        out = Slabs(x.depth)
        for i, chunk in enumerate(x.chunks):
            out.append(torch.addcmul(shift.view(1, -1, 1, 1, 1), chunk, scale.view(1, -1, 1, 1, 1)).to(chunk.dtype))
            x.chunks[i] = None
        return self.with_stats(out, True)

    def block(self, block: nn.Module, x: Slabs, pending: tuple | None, stats: bool) -> tuple[Slabs, tuple | None]:
        """One top-level block: ``(output, pending prologue)``."""
        c = self.classes
        if isinstance(block, nn.GroupNorm):
            if pending is not None:
                x = self.materialise(x, pending)
            return x, self.prologue(x, block, None)
        parts = _conv_parts(block, c)
        if parts is not None:
            conv, adn = parts
            kind = SlabConvTranspose if isinstance(conv, nn.ConvTranspose3d) else SlabConv
            out, _ = self.conv(x, self.op(kind, conv), prologue=pending, act=adn, stats=stats)
            return out, None
        x = self.materialise(x, pending)
        if type(block) is c["res"]:
            return self.resblock(block, x, stats), None
        if type(block) is c["up"] and self._nearest_up(block):
            return self.conv(x, self.op(NearestUpConv, block.postconv.conv), stats=stats)[0], None
        if type(block) is c["up"] and [n for n, _ in block.named_children()] == ["deconv"] \
                and SlabConvTranspose.supports(block.deconv):
            return self.conv(x, self.op(SlabConvTranspose, block.deconv), stats=stats)[0], None
        if type(block) is c["vqres"] and all(_conv_parts(m, c) and _same(m.conv) for m in (block.conv1, block.conv2)):
            h, _ = self.conv(x, self.op(SlabConv, block.conv1.conv), act=getattr(block.conv1, "adn", None),
                             release=False)
            return self.conv(h, self.op(SlabConv, block.conv2.conv), residual=x,
                             residual_act=lambda y: F.relu(y, inplace=True), stats=stats)[0], None
        if _pointwise(block):
            out = Slabs(x.depth)
            for i, chunk in enumerate(x.chunks):
                out.append(block(chunk))
                x.chunks[i] = None
            return self.with_stats(out, stats), None
        return self.whole(block, x, stats), None

    def _nearest_up(self, block: nn.Module) -> bool:
        names = [n for n, _ in block.named_children()]
        if names != ["upsample_non_trainable", "postconv"] or _conv_parts(block.postconv, self.classes) is None:
            return False
        up, post = block.upsample_non_trainable, block.postconv
        factor = up.scale_factor if isinstance(up.scale_factor, tuple) else (up.scale_factor,) * 3
        return (up.mode == "nearest" and up.size is None and all(float(f) == 2.0 for f in factor)
                and getattr(post, "adn", None) is None and NearestUpConv.supports(post.conv))

    def resblock(self, block: nn.Module, x: Slabs, stats: bool) -> Slabs:
        silu = lambda t: F.silu(t, inplace=True)  # noqa: E731 - in place, on a window
        shortcut = block.nin_shortcut
        side = None
        if not isinstance(shortcut, nn.Identity):
            side = self.op(SlabConv, getattr(shortcut, "conv", shortcut))
        h, side_out = self.conv(x, self.op(SlabConv, block.conv1.conv), prologue=self.prologue(x, block.norm1, silu),
                                side=side, release=side is not None, stats=True)
        residual = side_out if side is not None else x
        out, _ = self.conv(h, self.op(SlabConv, block.conv2.conv), prologue=self.prologue(h, block.norm2, silu),
                           residual=residual, stats=stats)
        return out

    def whole(self, block: nn.Module, x: Slabs, stats: bool) -> Slabs:
        """A block without a slab-wise form, on the whole tensor under the caller's autocast (hooks bypassed: the
        caller reports progress per block)."""
        device, dtype, enabled = self.autocast
        full = x.whole()
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            y = block.forward(full)
        del full
        y = y.to(self.dtype).contiguous(memory_format=CL)
        return self.with_stats(Slabs.of(y, [(0, y.shape[2])]), stats)

    @staticmethod
    def with_stats(x: Slabs, stats: bool) -> Slabs:
        if stats:
            x.stats = ChannelStats(x.first.shape[1], x.first.device)
            for chunk in x.chunks:
                x.stats.add(chunk)
        return x


def release_free_heap() -> None:
    """Hand the C allocator's free memory back to the system (glibc ``malloc_trim``; elsewhere nothing): memory freed
    by what ran before (a released U-Net: ~1 GB in ``generate``) otherwise stays resident beside the decode's own,
    which its large allocations do not reuse."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reads_stats(block: nn.Module | None, classes: dict[str, type]) -> bool:
    return block is not None and (isinstance(block, nn.GroupNorm) or type(block) is classes["res"])


@torch.no_grad()
def streamed_decode(autoencoder: nn.Module, latent: torch.Tensor, on_block: Callable[[], object] | None = None,
                    window_bytes: int = WINDOW_BYTES) -> torch.Tensor:
    """``autoencoder.decode_stage_2_outputs(latent)`` computed block by block over slabs (see the module doc), in
    float32, contiguous. ``on_block()`` runs after every top-level decoder block of every batch item;
    ``window_bytes``: the size of the slabs a new activation is cut into (smaller: less memory, more overhead)."""
    device = latent.device.type
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type without autocast (e.g. "meta", to count operations)
        enabled, device = False, "cpu"
    amp = torch.get_autocast_dtype(device) if enabled else None
    dtype = amp if amp is not None else torch.float32
    if hasattr(autoencoder, "post_quant_conv"):
        start = autoencoder.post_quant_conv(latent)
    else:
        start = autoencoder.quantize(latent)[0]
    walker = _Walker(dtype, (device, amp or torch.bfloat16, enabled), window_bytes)
    release_free_heap()
    blocks = list(autoencoder.decoder.blocks)
    images = []
    with torch.autocast(device, enabled=False), scratch_space():
        for i in range(start.shape[0]):
            x = Slabs.of(start[i : i + 1].to(dtype))
            pending = None
            for k, block in enumerate(blocks):
                nxt = blocks[k + 1] if k + 1 < len(blocks) else None
                x, pending = walker.block(block, x, pending, _reads_stats(nxt, walker.classes))
                if on_block is not None:
                    on_block()
            x = walker.materialise(x, pending)
            images.append(x.whole().float().contiguous())
    return torch.cat(images)
