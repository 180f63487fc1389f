"""The latent codec: an autoencoder plus its latent normalisation plus tiled encode/decode.

Diffusion code only ever sees ``codec.encode(image) -> z`` and ``codec.decode(z) -> image``; it never knows which
autoencoder (MONAI ``AutoencoderKL`` or ``VQVAE``) sits underneath, nor how latents are scaled.

The normalisation ``z = (latent - shift) * scale`` lives in the codec's ``state_dict`` as buffers, so it travels with
the weights: it is computed once after autoencoder training (:meth:`LatentCodec.calibrate`) and never recomputed at
inference (the MONAI tutorials compute ``scale_factor`` in training and lose it at inference).

Decoding whole volumes, three ways:

* the streamed decode (default for images of at least :data:`STREAM_MIN_VOXELS` voxels; ``stream=True`` always):
  :func:`~meddiff3d.models.streamed_decode.streamed_decode` runs the decoder block by block over slabs along the
  first spatial axis, GroupNorm with whole-volume statistics, every activation freed once consumed. Exact (the same
  float operations as one pass, other order of additions) and memory-bounded: on the anchor autoencoder (model-zoo
  brain LDM, 160x224x160, bf16, 2 threads) 2.5 GB peak RSS and faster than one pass (4.8 GB), within bf16 rounding of
  it; in float32 8.5e-5 max from one pass (see its module for figures).
* ``split=N``: convolutions run in N slabs along the first spatial axis (with halos) while GroupNorm keeps
  whole-volume statistics, as MONAI's MAISI autoencoder does. Equal to the one-pass result up to float rounding
  (measured max |diff| 2e-6; tested at 1e-4). It shrinks the temporaries of convolutions and norms, not the
  activations themselves (anchor: 7.6 GB, and slower). ``split=1`` is the plain one-pass forward.
* ``decode_tile`` / ``encode_tile`` (approximate): MONAI :func:`sliding_window_inference` with Gaussian blending, so
  peak memory is bounded by the tile. GroupNorm then normalises over each tile, whose intensity mix (background vs
  brain) differs from the whole volume's, so tiles are *not* faithful for these networks: on a trained tiny AE with
  tiles of half the volume and overlap 0.5 the decode differs by 0.06 mean / 0.4 max on [0, 1] images
  (``tests/test_codec.py``). The last resort, when even the streamed decode does not fit.

Decode speed on CPU: ``amp_dtype=torch.bfloat16`` and ``channels_last=True`` (``torch.channels_last_3d``). Measured on
2 threads, tiny KL AE (1.4 M parameters), 3x20x28x20 -> 160x224x160, one pass: fp32 11.1 s / 3.0 GB peak RSS, bf16
8.5 s / 1.7 GB, bf16 + channels_last 5.7 s / 1.6 GB.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from monai.inferers import sliding_window_inference

from meddiff3d.engine.checkpoint import CODEC_FORMAT, jsonable
from meddiff3d.engine.precision import autocast
from meddiff3d.models.streamed_decode import can_stream, streamed_decode
from meddiff3d.utils.io import atomic_path


#: ``LatentCodec(stream=None)`` streams decodes of images with at least this many voxels (128^3)
STREAM_MIN_VOXELS = 2**21


def _bounds(size: int, parts: int) -> list[tuple[int, int]]:
    edges = [round(i * size / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _slab_conv(conv: nn.Module, x: torch.Tensor, parts: int) -> torch.Tensor:
    """A stride-1 zero-padded convolution computed in ``parts`` slabs along the first spatial axis (with halos)."""
    pad = conv.padding
    plain = (
        isinstance(pad, str) or any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation)
        or conv.padding_mode != "zeros" or 2 * pad[0] != conv.kernel_size[0] - 1 or x.shape[2] < 2 * parts
    )
    if plain:
        return conv._conv_forward(x, conv.weight, conv.bias)
    p, depth = pad[0], x.shape[2]
    conv_fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[x.ndim - 2]
    out = None
    for a, b in _bounds(depth, parts):
        lo, hi = max(a - p, 0), min(b + p, depth)
        piece = x[:, :, lo:hi]
        extra = [0, 0] * (x.ndim - 3) + [p - (a - lo), p - (hi - b)]
        if any(extra):
            piece = F.pad(piece, extra)
        y = conv_fn(piece, conv.weight, conv.bias, 1, (0, *pad[1:]), 1, conv.groups)
        if out is None:
            out = torch.empty((y.shape[0], y.shape[1], depth, *y.shape[3:]), dtype=y.dtype, device=y.device,
                              memory_format=_format_of(x))
        out[:, :, a:b] = y
    return out


def _slab_group_norm(norm: nn.GroupNorm, x: torch.Tensor, parts: int) -> torch.Tensor:
    """GroupNorm with statistics over the whole tensor, accumulated (float64) and applied slab by slab."""
    n, c, g = x.shape[0], x.shape[1], norm.num_groups
    total = torch.zeros(n, g, dtype=torch.float64, device=x.device)
    total_sq = torch.zeros_like(total)
    slabs = _bounds(x.shape[2], parts)
    for a, b in slabs:
        piece = x[:, :, a:b].reshape(n, g, -1).double()
        total += piece.sum(-1)
        total_sq += piece.pow(2).sum(-1)
    count = x[0, 0].numel() * (c // g)
    mean = total / count
    inv_std = torch.rsqrt((total_sq / count - mean.pow(2)).clamp_min(0) + norm.eps)
    shape = (n, c, *([1] * (x.ndim - 2)))
    scale = inv_std.repeat_interleave(c // g, dim=1).view(shape)
    shift = -mean.repeat_interleave(c // g, dim=1).view(shape) * scale
    if norm.affine:
        w = norm.weight.double().view(1, c, *([1] * (x.ndim - 2)))
        scale, shift = scale * w, shift * w + norm.bias.double().view_as(w)
    out_dtype = torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device, memory_format=_format_of(x))
    scale, shift = scale.float(), shift.float()
    for a, b in slabs:
        out[:, :, a:b] = x[:, :, a:b].float() * scale + shift
    return out


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


@contextmanager
def split_execution(module: nn.Module, parts: int | None):
    """Within the context, ``module``'s convolutions and GroupNorms run in ``parts`` slabs along the first spatial
    axis, GroupNorm keeping whole-volume statistics (the approach of MONAI's MAISI autoencoder): the result equals the
    unsplit pass up to float rounding, while the convolutions' and norms' temporaries shrink to one slab."""
    if not parts or parts <= 1:
        yield
        return
    patched = []
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
            m.forward = types.MethodType(lambda self, x: _slab_conv(self, x, parts), m)
        elif isinstance(m, nn.GroupNorm):
            m.forward = types.MethodType(lambda self, x: _slab_group_norm(self, x, parts), m)
        else:
            continue
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


class LatentCodec(nn.Module):
    """Autoencoder + latent normalisation + optional tiling.

    Args:
        autoencoder: a MONAI ``AutoencoderKL`` or ``VQVAE`` (anything with ``encode_stage_2_inputs`` and
            ``decode_stage_2_outputs``; KL encoders also expose ``encode -> (mu, sigma)``).
        scale, shift: latent normalisation, ``z = (latent - shift) * scale``.
        sample_posterior: KL only; encode with a posterior sample instead of its mean.
        decode_tile: latent tile size for tiled decoding (``None`` decodes in one pass).
        encode_tile: image tile size for tiled encoding (``None`` encodes in one pass).
        overlap: tile overlap fraction; tiles are blended with a Gaussian window.
        split: exact memory-saving alternative to tiles: convolutions run in ``split`` slabs along the first spatial
            axis while GroupNorm keeps whole-volume statistics (:func:`split_execution`); equals the one-pass result
            up to float rounding. Combined with tiles, it applies within each tile.
        amp_dtype: autocast dtype for encode/decode (``torch.bfloat16`` on CPUs that support it), or ``None``.
        channels_last: run the autoencoder in ``torch.channels_last_3d`` memory format (often faster on CPU).
        stream: decode whole volumes with :func:`~meddiff3d.models.streamed_decode.streamed_decode` (exact,
            memory-bounded, faster) when neither ``decode_tile`` nor ``split`` asks otherwise and the autoencoder is a
            MONAI ``AutoencoderKL`` / ``VQVAE``; ``None`` (default): on the CPU, for images of at least
            :data:`STREAM_MIN_VOXELS` voxels (smaller ones fit anyway and decode faster in one pass); ``False``:
            never. ``split=1`` also asks for the plain one-pass forward.
    """

    def __init__(
        self,
        autoencoder: nn.Module,
        scale: float = 1.0,
        shift: float = 0.0,
        *,
        sample_posterior: bool = False,
        decode_tile: Sequence[int] | None = None,
        encode_tile: Sequence[int] | None = None,
        overlap: float = 0.25,
        split: int | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        stream: bool | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("latent_scale", torch.tensor(float(scale)))
        self.register_buffer("latent_shift", torch.tensor(float(shift)))
        self.sample_posterior = sample_posterior
        self.decode_tile = tuple(decode_tile) if decode_tile else None
        self.encode_tile = tuple(encode_tile) if encode_tile else None
        self.overlap = overlap
        self.split = split
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last
        self.stream = stream
        self.on_decoder_block = None  # set by decode_progress: called after each decoder block when streaming
        if channels_last:
            self.autoencoder.to(memory_format=torch.channels_last_3d)

    # -- geometry -------------------------------------------------------------------------------------------------
    @property
    def is_vq(self) -> bool:
        return hasattr(self.autoencoder, "quantize")

    @property
    def num_channels(self) -> int:
        """Latent channels."""
        ae = self.autoencoder
        if hasattr(ae, "latent_channels"):
            return int(ae.latent_channels)
        return int(ae.embedding_dim)

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction from image to latent: the product of the encoder's convolution strides."""
        factor = 1
        for module in self.autoencoder.encoder.modules():
            if isinstance(module, nn.modules.conv._ConvNd):
                factor *= int(module.stride[0])
        return factor

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        f = self.downsample_factor
        bad = [s for s in image_shape if s % f]
        if bad:
            raise ValueError(f"image shape {tuple(image_shape)} is not divisible by the downsampling factor {f}")
        return (self.num_channels, *(s // f for s in image_shape))

    # -- raw (unnormalised) passes ----------------------------------------------------------------------------------
    def _encode_raw(self, image: torch.Tensor) -> torch.Tensor:
        ae = self.autoencoder
        if self.is_vq:
            return ae.encode_stage_2_inputs(image)
        z_mu, z_sigma = ae.encode(image)
        return ae.sampling(z_mu, z_sigma) if self.sample_posterior else z_mu

    def _decode_raw(self, latent: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(latent)

    def _tiled(self, fn, x: torch.Tensor, tile: Sequence[int] | None) -> torch.Tensor:
        if self.channels_last and x.ndim == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with autocast(x.device, self.amp_dtype), split_execution(self.autoencoder, self.split):
            if tile is None or all(t >= s for t, s in zip(tile, x.shape[2:])):
                out = fn(x)
            else:
                out = sliding_window_inference(x, tile, 1, fn, overlap=self.overlap, mode="gaussian")
        return out.float().contiguous()

    # -- public -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, C, *spatial) -> normalised latent (B, num_channels, *spatial / factor)."""
        latent = self._tiled(self._encode_raw, image, self.encode_tile)
        return (latent - self.latent_shift) * self.latent_scale

    def streams(self, latent_shape: Sequence[int]) -> bool:
        """Whether :meth:`decode` of latents ``(B, C, *spatial)`` streams (:attr:`stream`; no tile smaller than the
        latent and no ``split`` asked for; a MONAI autoencoder)."""
        tile = self.decode_tile
        untiled = tile is None or all(t >= s for t, s in zip(tile, latent_shape[2:]))
        if self.stream is False or not untiled or self.split is not None or not can_stream(self.autoencoder):
            return False
        if self.stream is None:  # measured on CPUs only: elsewhere it has to be asked for
            voxels = math.prod(int(s) * self.downsample_factor for s in latent_shape[2:])
            return voxels >= STREAM_MIN_VOXELS and self.latent_scale.device.type == "cpu"
        return True

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> image."""
        latent = z / self.latent_scale + self.latent_shift
        if self.streams(latent.shape):
            with autocast(latent.device, self.amp_dtype):
                return streamed_decode(self.autoencoder, latent, self.on_decoder_block)
        return self._tiled(self._decode_raw, latent, self.decode_tile)

    @torch.no_grad()
    def calibrate(self, images: Iterable[torch.Tensor], use_shift: bool = True) -> tuple[float, float]:
        """Set the normalisation from the latents of ``images`` so they have zero mean (if ``use_shift``) and unit std.

        Call once after autoencoder training; the values are stored in this module's buffers (and so in its
        ``state_dict``). Returns ``(scale, shift)``.
        """
        total, total_sq, count = 0.0, 0.0, 0
        for image in images:
            latent = self._tiled(self._encode_raw, image, self.encode_tile).double()
            total += latent.sum().item()
            total_sq += (latent**2).sum().item()
            count += latent.numel()
        if count == 0:
            raise ValueError("calibrate() got no images")
        mean = total / count
        var = max(total_sq / count - mean**2, 1e-12)
        shift = mean if use_shift else 0.0
        std = (var + (0.0 if use_shift else mean**2)) ** 0.5
        self.latent_scale.fill_(1.0 / std)
        self.latent_shift.fill_(shift)
        return 1.0 / std, shift


# -- decode progress -------------------------------------------------------------------------------------------------
def _decoder_blocks(codec: LatentCodec) -> list[nn.Module]:
    decoder = codec.autoencoder.decoder
    blocks = getattr(decoder, "blocks", None)  # MONAI AutoencoderKL / VQVAE decoders: an nn.ModuleList of stages
    return list(blocks) if blocks is not None and len(blocks) else [decoder]


def decode_steps(codec: LatentCodec, latent_shape: Sequence[int], tile: Sequence[int] | None = None) -> int:
    """How often :func:`decode_progress` reports during one ``codec.decode`` of latents ``(B, C, *spatial)`` with
    latent tile size ``tile`` (the ``decode_tile`` in use; ``None``: whole volumes): once per top-level decoder block,
    per batch item when streamed (:meth:`LatentCodec.streams`, with the codec's ``split``), per tile and batch item when
    tiled (windows as MONAI's ``sliding_window_inference`` lays them out)."""
    blocks = len(_decoder_blocks(codec))
    batch, shape = int(latent_shape[0]), [int(s) for s in latent_shape[2:]]
    if tile is None or all(t >= s for t, s in zip(tile, shape)):
        saved = codec.decode_tile
        codec.decode_tile = tile
        try:
            streamed = codec.streams(latent_shape)
        finally:
            codec.decode_tile = saved
        return blocks * batch if streamed else blocks
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = [max(s, t) for s, t in zip(shape, tile)]  # sliding_window_inference pads a volume smaller than the tile
    interval = _get_scan_interval(size, list(tile), len(size), [codec.overlap] * len(size))
    return blocks * batch * len(dense_patch_slices(size, list(tile), interval))


@contextmanager
def decode_progress(codec: LatentCodec, callback):
    """Within the context, ``callback()`` runs after every top-level block of ``codec``'s decoder (whatever calls
    ``codec.decode``: an inferer, healing): :func:`decode_steps` calls per decode. ``None`` does nothing."""
    if callback is None:
        yield
        return
    def hook(*_: Any) -> None:  # a forward hook returning a value would replace the block's output
        callback()

    handles = [block.register_forward_hook(hook) for block in _decoder_blocks(codec)]
    codec.on_decoder_block = callback  # the streamed decode bypasses the blocks' forward (and so these hooks)
    try:
        yield
    finally:
        codec.on_decoder_block = None
        for handle in handles:
            handle.remove()


# -- the codec file: weights + everything inference needs ----------------------------------------------------------
def save_codec(codec: LatentCodec, path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``{"format", "weights": codec.state_dict() (latent scale/shift included), "meta"}`` atomically; read it
    back with :func:`meddiff3d.models.loading.load_model` ``(path, "codec")``.

    ``meta`` must describe the autoencoder (``{"network": {"class": ..., "args": {...}}}``) and should hold the image
    geometry and intensity normalisation the autoencoder was trained with (``"image": {...}``).
    """
    if "network" not in meta:
        raise ValueError("codec meta needs a 'network' entry {'class': ..., 'args': {...}}")
    payload = {
        "format": CODEC_FORMAT,
        "weights": {k: v.detach().cpu() for k, v in codec.state_dict().items()},
        "meta": jsonable(dict(meta), "codec meta"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def codec_fingerprint(weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> str:
    """SHA-256 of a codec's content (tensor names and bytes, latent scale/shift included, plus its meta as JSON):
    stable across re-saves, changed by any change of weights, normalisation or description. A latent diffusion model
    records it to refuse any other codec (:func:`meddiff3d.models.ldm.check_codec_pair`)."""
    h = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tensor.dtype).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()
