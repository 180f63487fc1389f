"""The streamed decode (meddiff3d.models.streamed_decode) is the one-pass decode, in bounded memory.

Random-weight autoencoders covering every decoder block type the streamed decode knows (the anchor KL architecture at
small size: 1x1 shortcuts, nearest upsampling, the final GroupNorm; attention and transposed-convolution upsampling;
a VQ-VAE), odd latent sizes, batches of two, slabs much smaller than the volume. Memory is measured by torch's
profiler (bytes of tensors alive), not by RSS, so it does not depend on the machine; the process peak RSS at full size
(anchor autoencoder, 160x224x160) is the benchmark's figure (scripts/bench_brain_ldm.py, against the MONAI reference).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.models.autoencoder import autoencoder_spec
from meddiff3d.models.codec import LatentCodec, decode_progress, decode_steps
from meddiff3d.models.streamed_decode import can_stream, streamed_decode

SPECS = {
    # the anchor (model-zoo brain LDM) architecture at small size: 4 levels, 2 ResBlocks each, channel changes
    "kl_anchor": autoencoder_spec("kl", "anchor", channels=[8, 16, 16, 16], norm_num_groups=8),
    # attention at the latent level (runs whole) and transposed-convolution upsampling
    "kl_attention_deconv": autoencoder_spec("kl", "tiny", channels=[8, 16], num_res_blocks=[1, 2],
                                            norm_num_groups=8, attention_levels=[False, True],
                                            with_decoder_nonlocal_attn=True, use_convtranspose=True),
    "vq": autoencoder_spec("vq", "tiny"),
}
LATENT = (2, 3, 5, 7, 3)  # batch 2, odd sizes
SMALL_WINDOW = 2**14  # bytes: every activation in many slabs
FP32_TOLERANCE = 1e-4


def _autoencoder(name):
    torch.manual_seed(0)
    return build_network(SPECS[name]).eval()


def _one_pass(ae, z, amp):
    codec = LatentCodec(ae, amp_dtype=amp, channels_last=amp is not None, stream=False).eval()
    return codec.decode(z)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_streamed_equals_one_pass_in_float32(name):
    ae = _autoencoder(name)
    z = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    full = _one_pass(ae, z, None)
    assert can_stream(ae)
    streamed = streamed_decode(ae, z, window_bytes=SMALL_WINDOW)
    assert streamed.shape == full.shape and streamed.dtype == torch.float32 and streamed.is_contiguous()
    torch.testing.assert_close(streamed, full, atol=FP32_TOLERANCE, rtol=0)
    codec = LatentCodec(ae, stream=True).eval()  # through the codec, default slabs
    torch.testing.assert_close(codec.decode(z), full, atol=FP32_TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_streamed_is_within_bf16_rounding_under_autocast(name):
    """Under bf16 autocast the streamed decode is as close to the float32 decode as the one-pass bf16 decode is."""
    ae = _autoencoder(name)
    z = torch.randn(*LATENT, generator=torch.Generator().manual_seed(1))
    exact = _one_pass(ae, z, None)
    one_pass = _one_pass(ae, z, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        streamed = streamed_decode(ae, z, window_bytes=SMALL_WINDOW)
    assert streamed.dtype == torch.float32
    err_one, err_streamed = (one_pass - exact).abs(), (streamed - exact).abs()
    scale = float(exact.abs().mean())
    assert float(err_one.mean()) < 0.05 * scale  # bf16 rounding, not something else
    assert float(err_streamed.mean()) <= 1.5 * float(err_one.mean()) + 1e-6
    assert float(err_streamed.max()) <= 2.0 * float(err_one.max()) + 1e-6


def _peak_bytes(fn, tmp_path) -> int:
    """Peak bytes of CPU tensors alive while ``fn`` runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    assert totals, "the profiler reported no memory events"
    return max(totals)


def test_streamed_decode_holds_about_one_activation(tmp_path):
    """One pass holds several full-resolution activations (and float32 GroupNorm temporaries); the streamed decode
    about the largest one plus slabs (float32 here: the bound is about tensors alive, in any dtype)."""
    ae = _autoencoder("kl_anchor")
    z = torch.randn(1, 3, 6, 8, 5)
    largest = 16 * (6 * 8) * (8 * 8) * (5 * 8) * 4  # the 16-channel full-resolution activation, float32
    with torch.no_grad():
        one = _peak_bytes(lambda: ae.decode_stage_2_outputs(z), tmp_path)
        streamed = _peak_bytes(lambda: streamed_decode(ae, z, window_bytes=2**16), tmp_path)
    print(f"peak tensors alive: one pass {one / 1e6:.1f} MB, streamed {streamed / 1e6:.1f} MB, "
          f"largest activation {largest / 1e6:.1f} MB")
    assert one > 3 * largest
    assert streamed < 1.3 * largest


@pytest.mark.parametrize("stream", [True, False])
def test_decode_progress_and_steps_when_streaming(stream):
    """The streamed decode reports once per decoder block and batch item, as decode_steps predicts."""
    ae = _autoencoder("kl_anchor")
    codec = LatentCodec(ae, stream=stream).eval()
    z = torch.randn(*LATENT)
    calls = []
    with decode_progress(codec, lambda: calls.append(1)):
        codec.decode(z)
    blocks = len(ae.decoder.blocks)
    assert len(calls) == decode_steps(codec, z.shape) == (blocks * LATENT[0] if stream else blocks)
    assert codec.on_decoder_block is None


def test_codec_decode_strategies():
    """stream=None streams large volumes only; an explicit split or a tile smaller than the latent turns streaming
    off (split=1: one pass)."""
    ae = _autoencoder("kl_anchor")
    codec = LatentCodec(ae).eval()
    assert codec.streams((1, 3, 20, 28, 20)) and not codec.streams((1, 3, 5, 7, 3))
    codec.stream = True
    assert codec.streams((1, 3, 5, 7, 3))
    codec.split = 1
    assert not codec.streams((1, 3, 5, 7, 3))
    codec.split, codec.decode_tile = None, (4, 4, 4)
    assert not codec.streams((1, 3, 5, 7, 3)) and codec.streams((1, 3, 4, 4, 4))


DEMO_CODEC = Path(__file__).resolve().parents[1] / "bundles" / "brain_mri_ldm" / "models" / "autoencoder.pt"


def _demo_codec(stream, dtype=None):
    """The demo codec as generation loads it (bf16: weights readied for autocast, channels-last)."""
    from meddiff3d.models.loading import load_model

    options = {"amp_dtype": dtype, "channels_last": True} if dtype is not None else {}
    return load_model(DEMO_CODEC, "codec", dtype=dtype, stream=stream, **options).network.eval()


def test_streamed_equals_one_pass_on_the_trained_demo_autoencoder():
    """The shipped (trained) demo autoencoder on a latent of the demo's statistics: streamed = one pass to float
    rounding in float32, and within the one pass's own bf16 rounding under autocast."""
    torch.manual_seed(0)
    z = torch.randn(1, 3, 8, 10, 8)
    with torch.no_grad():
        ref = _demo_codec(False).decode(z)
        streamed = _demo_codec(True).decode(z)
        assert (streamed - ref).abs().max() < FP32_TOLERANCE
        one_bf16 = _demo_codec(False, torch.bfloat16).decode(z).float()
        streamed_bf16 = _demo_codec(True, torch.bfloat16).decode(z).float()
    bf16_rounding = (one_bf16 - ref).abs()
    diff = (streamed_bf16 - ref).abs()
    assert diff.mean() < 1.5 * bf16_rounding.mean() and diff.max() < 2.0 * bf16_rounding.max() + 1e-3
