import pytest
import torch

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError
from meddiff3d.models.codec import LatentCodec, decode_progress, decode_steps, save_codec
from meddiff3d.models.loading import load_model


def load_codec(path):
    loaded = load_model(path, "codec")
    return loaded.network, loaded.meta

KL_SPEC = {
    "class": "monai.networks.nets.AutoencoderKL",
    "args": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
                 num_res_blocks=1, attention_levels=[False, False, False], norm_num_groups=8,
                 with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
}


def test_latent_scale_travels_with_the_codec_file(tmp_path):
    torch.manual_seed(0)
    codec = LatentCodec(build_network({"network": KL_SPEC})).eval()
    images = [torch.rand(1, 1, 16, 16, 16) for _ in range(3)]
    scale, shift = codec.calibrate(images)
    z = torch.cat([codec.encode(x) for x in images])
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std()) - 1) < 1e-2
    save_codec(codec, tmp_path / "codec.pt", {"network": KL_SPEC, "image": {"spacing": [1, 1, 1]}})
    data = torch.load(tmp_path / "codec.pt", weights_only=True)
    assert float(data["weights"]["latent_scale"]) == pytest.approx(scale)
    loaded, meta = load_codec(tmp_path / "codec.pt")
    assert float(loaded.latent_scale) == pytest.approx(scale) and float(loaded.latent_shift) == pytest.approx(shift)
    assert meta["image"]["spacing"] == [1, 1, 1]
    torch.testing.assert_close(loaded.decode(z[:1]), codec.decode(z[:1]))
    assert codec.latent_shape((16, 16, 16)) == (3, 4, 4, 4)


@pytest.mark.parametrize("tile", [None, (2, 6, 4), (4, 2, 8), (9, 9, 9)])
def test_decode_progress_reports_every_decoder_block_of_every_tile(tile):
    """decode_progress calls back once per top-level decoder block (per tile when tiled), decode_steps counts them
    beforehand, and the hooks are gone afterwards (the decode itself is unchanged)."""
    torch.manual_seed(0)
    codec = LatentCodec(build_network({"network": KL_SPEC}), decode_tile=tile, overlap=0.5).eval()
    z = torch.randn(2, 3, 4, 6, 4)
    plain = codec.decode(z)
    calls = []
    with decode_progress(codec, lambda: calls.append(1) or True):  # a callback's return value is ignored
        reported = codec.decode(z)
    blocks = len(codec.autoencoder.decoder.blocks)
    assert len(calls) == decode_steps(codec, z.shape, tile) and blocks > 3
    assert len(calls) == blocks if tile in (None, (9, 9, 9)) else len(calls) > blocks
    torch.testing.assert_close(reported, plain)
    codec.decode(z)
    assert len(calls) == decode_steps(codec, z.shape, tile)  # hooks removed
    with decode_progress(codec, None):
        codec.decode(z)


def test_codec_file_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_codec(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt.*cannot be read"):
        load_codec(tmp_path / "junk.pt")
    codec = LatentCodec(build_network({"network": KL_SPEC}))
    other = dict(KL_SPEC, args=dict(KL_SPEC["args"], channels=[8, 16, 32], norm_num_groups=8))
    save_codec(codec, tmp_path / "c.pt", {"network": other})
    with pytest.raises(InputError, match="c.pt.*shape mismatches"):
        load_codec(tmp_path / "c.pt")


def _damage(data, change):
    if change == "no weights":
        data.pop("weights")
    elif change == "weights a list":
        data["weights"] = [1, 2]
    elif change == "a weight a string":
        data["weights"][next(iter(data["weights"]))] = "abc"
    elif change == "args a list":
        data["meta"]["network"]["args"] = [1]
    elif change == "args MONAI refuses":
        data["meta"]["network"]["args"]["norm_num_groups"] = 5
    return data


@pytest.mark.parametrize("change, message", [
    ("no weights", "has no 'weights' entry \\(it holds: format, meta\\)"),
    ("weights a list", "its 'weights' entry is not a state dict \\(parameter name -> tensor\\)"),
    ("a weight a string", "its 'weights' entry is not a state dict"),
    ("args a list", "network class 'monai.networks.nets.AutoencoderKL': its args must be a mapping, got list"),
    ("args MONAI refuses", "rejects the arguments .*multiple of norm_num_groups"),
])
def test_damaged_codec_file_is_one_named_error(tmp_path, change, message):
    save_codec(LatentCodec(build_network({"network": KL_SPEC})), tmp_path / "good.pt", {"network": KL_SPEC})
    torch.save(_damage(torch.load(tmp_path / "good.pt", weights_only=True), change), tmp_path / "codec.pt")
    with pytest.raises(InputError, match=f"^codec file {tmp_path / 'codec.pt'}.* {message}") as err:
        load_codec(tmp_path / "codec.pt")
    assert "\n" not in str(err.value)
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(InputError, match="^codec file .*folder.pt is a directory, expected a file$"):
        load_codec(tmp_path / "folder.pt")


# ---------------------------------------------------------------------------------- tiling on a (briefly) trained AE
TRAINED_SPEC = {
    "class": "monai.networks.nets.AutoencoderKL",
    "args": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
                 num_res_blocks=1, attention_levels=[False] * 3, norm_num_groups=8,
                 with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False),
}
#: measured on such AEs (32x48x32 volume, latent 8x12x8): split execution max |diff| 2e-6 (decode and encode);
#: sliding windows of latent 6^3 / image 24^3 with overlap 0.5: decode mean |diff| 0.06-0.17 (max 0.4-0.6) on [0, 1]
#: images, encode mean |diff| 0.14-0.2 (normalised latent units): each tile's GroupNorm statistics differ from the
#: whole volume's. Sliding windows are therefore a memory fallback, not a faithful equivalent (see codec.py).
SPLIT_TOLERANCE = 1e-4
SLIDING_DECODE_MEAN_TOLERANCE = 0.25
SLIDING_ENCODE_MEAN_TOLERANCE = 0.4


@pytest.fixture(scope="module")
def trained_codec(tmp_path_factory):
    """A tiny KL AE trained for 200 L1 steps (batch 2) on 16^3 patches of a procedural synthetic cohort (~6 s)."""
    from meddiff3d.data.datalist import load_datalist
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.data.transforms import t1_brain_transforms

    out = tmp_path_factory.mktemp("codec_cohort")
    datalist = write_cohort("healthy", out, 8, shape=(32, 48, 32), source="procedural", progress=False).datalist
    transform = t1_brain_transforms((5.0, 4.666667, 5.0), (32, 48, 32), train=False)
    train = [transform(i)["image"].as_tensor()[None] for i in load_datalist(datalist, "training")]
    val = transform(load_datalist(datalist, "validation")[0])["image"].as_tensor()[None]
    torch.manual_seed(0)
    codec = LatentCodec(build_network(TRAINED_SPEC))
    with torch.no_grad():
        untrained_error = float((codec.autoencoder.reconstruct(val) - val).abs().mean())
    opt = torch.optim.Adam(codec.autoencoder.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        x = torch.cat([train[(2 * step + k) % len(train)] for k in range(2)])
        a, b, c = (int(torch.randint(0, s - 15, (), generator=gen)) for s in x.shape[2:])
        patch = x[:, :, a : a + 16, b : b + 16, c : c + 16]
        opt.zero_grad()
        (codec.autoencoder.reconstruct(patch) - patch).abs().mean().backward()
        opt.step()
    codec.eval().calibrate(train[:3])
    codec.untrained_error = untrained_error
    return codec, val


def test_split_execution_equals_the_full_pass(trained_codec):
    codec, x = trained_codec
    z = codec.encode(x)
    full = codec.decode(z)
    assert float((full - x).abs().mean()) < min(0.3, 0.8 * codec.untrained_error)  # it did learn
    for parts in (2, 5):
        codec.split = parts
        try:
            torch.testing.assert_close(codec.decode(z), full, atol=SPLIT_TOLERANCE, rtol=0)
            torch.testing.assert_close(codec.encode(x), z, atol=SPLIT_TOLERANCE, rtol=0)
        finally:
            codec.split = None


def test_streamed_decode_equals_the_full_pass(trained_codec):
    """The exact memory-bounded decode (meddiff3d.models.streamed_decode) on a trained AE: float32 to float
    rounding; under bf16 autocast as close to the float32 decode as the one-pass bf16 decode."""
    from meddiff3d.models.streamed_decode import streamed_decode

    codec, x = trained_codec
    z = codec.encode(x)
    codec.stream = False
    try:
        full = codec.decode(z)
        latent = z / codec.latent_scale + codec.latent_shift
        torch.testing.assert_close(streamed_decode(codec.autoencoder, latent, window_bytes=2**14), full,
                                   atol=SPLIT_TOLERANCE, rtol=0)
        fast = LatentCodec(build_network(TRAINED_SPEC), amp_dtype=torch.bfloat16, channels_last=True,
                           stream=False).eval()
        fast.load_state_dict(codec.state_dict())
        one_pass_bf16 = fast.decode(z)
        fast.stream = True
        streamed_bf16 = fast.decode(z)
    finally:
        codec.stream = None
    err_one, err_streamed = (one_pass_bf16 - full).abs(), (streamed_bf16 - full).abs()
    print(f"bf16 vs float32: one pass mean {float(err_one.mean()):.2e} max {float(err_one.max()):.2e}, "
          f"streamed mean {float(err_streamed.mean()):.2e} max {float(err_streamed.max()):.2e}")
    assert float(err_streamed.mean()) <= 1.5 * float(err_one.mean()) + 1e-6
    assert float(err_streamed.max()) <= 2.0 * float(err_one.max()) + 1e-6


def test_sliding_window_tiles_agree_within_the_stated_tolerance(trained_codec):
    codec, x = trained_codec
    z = codec.encode(x)
    full = codec.decode(z)
    codec.decode_tile, codec.encode_tile, codec.overlap = (6, 6, 6), (24, 24, 24), 0.5
    try:
        tiled_image, tiled_latent = codec.decode(z), codec.encode(x)
    finally:
        codec.decode_tile, codec.encode_tile, codec.overlap = None, None, 0.25
    assert tiled_image.shape == full.shape and tiled_latent.shape == z.shape
    decode_error, encode_error = float((tiled_image - full).abs().mean()), float((tiled_latent - z).abs().mean())
    print(f"sliding-window tiles vs one pass: decode mean |diff| {decode_error:.4f} "
          f"(max {float((tiled_image - full).abs().max()):.3f}), encode mean |diff| {encode_error:.4f}")
    assert decode_error < SLIDING_DECODE_MEAN_TOLERANCE and encode_error < SLIDING_ENCODE_MEAN_TOLERANCE
    codec.decode_tile = (8, 12, 8)  # a tile covering the whole latent is the full pass
    try:
        torch.testing.assert_close(codec.decode(z), full)
    finally:
        codec.decode_tile = None


def test_bf16_and_channels_last_options(trained_codec):
    codec, x = trained_codec
    z = codec.encode(x)
    full = codec.decode(z)
    fast = LatentCodec(build_network(TRAINED_SPEC), amp_dtype=torch.bfloat16, channels_last=True).eval()
    fast.load_state_dict(codec.state_dict())
    out = fast.decode(z)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert float((out - full).abs().mean()) < 0.01  # bf16 rounding only
    assert float((out - full).abs().max()) < 0.1


def test_vq_codec_geometry_and_round_trip(tmp_path):
    spec = {"class": "monai.networks.nets.VQVAE",
            "args": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16], num_res_channels=[8, 16],
                         num_res_layers=1, downsample_parameters=[[2, 4, 1, 1]] * 2,
                         upsample_parameters=[[2, 4, 1, 1, 0]] * 2, num_embeddings=16, embedding_dim=3)}
    codec = LatentCodec(build_network(spec)).eval()
    assert codec.is_vq and codec.downsample_factor == 4 and codec.num_channels == 3
    x = torch.rand(1, 1, 16, 16, 16)
    codec.calibrate([x])
    save_codec(codec, tmp_path / "vq.pt", {"network": spec})
    loaded, _ = load_codec(tmp_path / "vq.pt")
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), codec.decode(codec.encode(x)))
