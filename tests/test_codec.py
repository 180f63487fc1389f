import pytest
import torch

from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError
from meddiff3d.models.codec import LatentCodec, load_codec, save_codec

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
