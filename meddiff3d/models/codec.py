"""The latent codec: an autoencoder plus its latent normalisation plus tiled encode/decode.

Diffusion code only ever sees ``codec.encode(image) -> z`` and ``codec.decode(z) -> image``; it never knows which
autoencoder (MONAI ``AutoencoderKL`` or ``VQVAE``) sits underneath, nor how latents are scaled.

The normalisation ``z = (latent - shift) * scale`` lives in the codec's ``state_dict`` as buffers, so it travels with
the weights: it is computed once after autoencoder training (:meth:`LatentCodec.calibrate`) and never recomputed at
inference (the MONAI tutorials compute ``scale_factor`` in training and lose it at inference).

Tiled (sliding-window) encoding and decoding use MONAI's :func:`sliding_window_inference` with Gaussian blending of
overlapping tiles, so peak memory is bounded by the tile size. Both networks are convolutional, but their GroupNorm
layers normalise over whatever extent they see, so a tile's output is not bit-equal to the same region of a full pass:
the blended result agrees with the full decode to a tolerance measured in ``tests/test_codec.py``.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from monai.inferers import sliding_window_inference

from meddiff3d.engine.checkpoint import build_network, check_state_fits, jsonable
from meddiff3d.errors import InputError
from meddiff3d.utils.io import atomic_path

CODEC_FORMAT = "meddiff3d.codec/1"


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` (bf16/fp16) on ``device``, or a no-op for ``None``/fp32."""
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=dtype)


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
        amp_dtype: autocast dtype for encode/decode (``torch.bfloat16`` on CPUs that support it), or ``None``.
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
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.register_buffer("latent_scale", torch.tensor(float(scale)))
        self.register_buffer("latent_shift", torch.tensor(float(shift)))
        self.sample_posterior = sample_posterior
        self.decode_tile = tuple(decode_tile) if decode_tile else None
        self.encode_tile = tuple(encode_tile) if encode_tile else None
        self.overlap = overlap
        self.amp_dtype = amp_dtype

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
        """Spatial reduction from image to latent (2 per down level)."""
        ae = self.autoencoder
        if self.is_vq:
            return 2 ** len(ae.downsample_parameters)
        return 2 ** (len(ae.encoder.channels) - 1)

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
        with autocast_context(x.device, self.amp_dtype):
            if tile is None or all(t >= s for t, s in zip(tile, x.shape[2:])):
                out = fn(x)
            else:
                out = sliding_window_inference(x, tile, 1, fn, overlap=self.overlap, mode="gaussian")
        return out.float()

    # -- public -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image (B, C, *spatial) -> normalised latent (B, num_channels, *spatial / factor)."""
        latent = self._tiled(self._encode_raw, image, self.encode_tile)
        return (latent - self.latent_shift) * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latent -> image."""
        latent = z / self.latent_scale + self.latent_shift
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


# -- the codec file: weights + everything inference needs ----------------------------------------------------------
def save_codec(codec: LatentCodec, path: str | os.PathLike, meta: Mapping[str, Any]) -> Path:
    """Write ``{"format", "weights": codec.state_dict() (latent scale/shift included), "meta"}`` atomically.

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


def load_codec(path: str | os.PathLike, map_location: str | torch.device = "cpu", **options) -> tuple[LatentCodec, dict]:
    """Rebuild the codec saved by :func:`save_codec`; ``options`` (tiles, overlap, amp_dtype) are inference settings.

    The latent scale/shift come from the file, never from ``options``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"codec file {path} does not exist")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise InputError(f"codec file {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or data.get("format") != CODEC_FORMAT:
        raise InputError(f"codec file {path} is not a meddiff3d codec (format {CODEC_FORMAT!r})")
    meta = data["meta"]
    try:
        codec = LatentCodec(build_network(meta), **options)
    except InputError as err:
        raise InputError(f"codec file {path}: {err}") from err
    check_state_fits(data["weights"], codec, f"codec file {path}")
    codec.load_state_dict(data["weights"])
    return codec.eval(), meta
