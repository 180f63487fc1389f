"""Device and mixed-precision choices: which device to train on, which autocast dtype, and whether to scale gradients.

``amp`` values:

- ``"none"`` / ``False``: full float32.
- ``"bf16"``: bfloat16 autocast (CPU and CUDA); no gradient scaling needed (bf16 has float32's exponent range).
- ``"fp16"``: float16 autocast with a ``GradScaler`` (CUDA only).
- ``"auto"`` / ``True``: on CUDA bf16 where the GPU supports it, otherwise fp16; on CPU float32, because bf16 autocast
  on CPUs without native bf16 units (most without AMX / AVX512-BF16) is slower than float32 and less accurate. Ask for
  ``"bf16"`` explicitly to use it on a CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from meddiff3d.errors import InputError

AMP_CHOICES = ("none", "bf16", "fp16", "auto")


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"``: the local GPU if CUDA is available, else the CPU; ``"cuda"``: ``cuda:LOCAL_RANK`` under torchrun."""
    if isinstance(device, torch.device):
        return device
    name = str(device).lower()
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' was requested but CUDA is not available; use 'cpu' or 'auto'")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise InputError(f"unknown device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'") from err


@dataclass(frozen=True)
class Precision:
    """The resolved mixed-precision policy for one device."""

    device_type: str
    dtype: torch.dtype | None  # None: no autocast

    @property
    def name(self) -> str:
        return {None: "none", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device_type) if self.needs_grad_scaler else None


def resolve_precision(amp: str | bool | None, device: torch.device) -> Precision:
    """Turn the ``amp`` setting into a :class:`Precision` for ``device`` (see the module docstring)."""
    if amp is True:
        name = "auto"
    elif amp is False or amp is None:
        name = "none"
    else:
        name = str(amp).lower()
    if name not in AMP_CHOICES:
        raise InputError(f"unknown amp setting {amp!r}: expected one of {', '.join(AMP_CHOICES)} (or true/false)")
    kind = device.type
    if name == "auto":
        if kind == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "none"
    if name == "none":
        return Precision(kind, None)
    if name == "fp16" and kind != "cuda":
        raise InputError(f"amp 'fp16' needs a CUDA device, got {device}; use 'bf16' or 'none' on {kind}")
    dtype = torch.bfloat16 if name == "bf16" else torch.float16
    if not torch.amp.autocast_mode.is_autocast_available(kind):
        raise InputError(f"autocast is not available on device type {kind!r}; use amp 'none'")
    return Precision(kind, dtype)


#: layers autocast runs in the low-precision dtype (on CPU and CUDA): their weights can be stored in it
AUTOCAST_LOW_PRECISION_LAYERS = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)


def store_for_autocast(module: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """Store the weights of the layers autocast computes in ``dtype`` (convolutions, linear layers) in ``dtype``;
    norms and everything else keep float32.

    Under ``torch.autocast(dtype=dtype)`` the result is the same as with float32 weights, because autocast casts those
    weights to ``dtype`` before each call anyway; but the weights take half the memory (no float32 master copy plus a
    cached low-precision copy) and no time goes to casting them at every step. The module must then only be run under
    autocast (:class:`meddiff3d.pipelines.generation.Autocast` does). ``dtype=None`` (float32) leaves it unchanged.
    Inference only: an optimiser would update the rounded weights.
    """
    if dtype is None or dtype == torch.float32:
        return module
    for layer in module.modules():
        if isinstance(layer, AUTOCAST_LOW_PRECISION_LAYERS):
            layer.to(dtype)
    return module
