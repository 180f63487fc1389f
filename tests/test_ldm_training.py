"""Training the latent diffusion model on a tiny synthetic cohort: latent cache, meta layout, resume, then sampling."""

import json

import numpy as np
import pytest
import torch

from meddiff3d.diffusion import DiffusionObjective, NoiseSchedule
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import BRAIN_COVARIATES, NULL_COVARIATE, null_condition
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.benchmark import untrained_pair
from meddiff3d.pipelines.data import synthetic_datalist
from meddiff3d.pipelines.generation import generate
from meddiff3d.pipelines.latents import encode_latents
from meddiff3d.pipelines.training import network_spec, train_latent_diffusion


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm_train")
    datalist = synthetic_datalist(root / "data", n=6, shape=(32, 48, 32), progress=False)
    codec, _ = untrained_pair(root / "pair")
    return root, datalist, codec


def test_synthetic_datalist_is_written_once(cohort):
    root, datalist, _ = cohort
    stamp = (root / "data" / "datalist.json").stat().st_mtime_ns
    assert synthetic_datalist(root / "data", n=6, shape=(32, 48, 32), progress=False) == datalist
    assert (root / "data" / "datalist.json").stat().st_mtime_ns == stamp


def test_latents_are_cached_and_tied_to_the_codec(cohort, tmp_path):
    _, datalist, codec = cohort
    first = encode_latents(codec, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False)
    assert not first.reused and first.latents.shape[1:] == (3, 8, 12, 8)
    assert first.covariates.shape == (len(first.ids), 4) and bool(((0 <= first.covariates) & (first.covariates <= 1)).all())
    assert first.image["shape"] == [32, 48, 32] and first.image["spacing"] == [5.0, 5.0, 5.0]
    again = encode_latents(codec, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False)
    assert again.reused and torch.equal(again.latents, first.latents)
    other, _ = untrained_pair(tmp_path / "other", seed=1)
    redone = encode_latents(other, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False)
    assert not redone.reused and not torch.equal(redone.latents, first.latents)
    with pytest.raises(InputError, match="image shape .* differs from the codec"):
        encode_latents(codec, datalist, tmp_path / "x", covariates=BRAIN_COVARIATES, shape=(64, 64, 64), progress=False)


def test_hostile_latent_cache_is_encoded_again_never_run(cohort, tmp_path, caplog):
    """A cache holding code, a truncated cache or a partial file of a killed encoding: encoded again (one warning)."""
    import logging

    _, datalist, codec = cohort
    first = encode_latents(codec, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False)
    cache, marker = tmp_path / "latents.pt", tmp_path / "code_ran"
    partial = tmp_path / ".latents.pt.abcd1234.tmp.pt"
    partial.write_bytes(b"PK\x03\x04")

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for content in ({"format": "meddiff3d.latents/1", "key": Payload()}, b"PK\x03\x04 truncated"):
        torch.save(content, cache) if isinstance(content, dict) else cache.write_bytes(content)
        with caplog.at_level(logging.WARNING, logger="meddiff3d.pipelines"):
            redone = encode_latents(codec, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False)
        assert not redone.reused and torch.equal(redone.latents, first.latents)
        assert "latent cache" in caplog.text and "encoding again" in caplog.text
        caplog.clear()
    assert not marker.exists() and not partial.exists()
    assert encode_latents(codec, datalist, tmp_path, covariates=BRAIN_COVARIATES, progress=False).reused


def test_latent_network_reads_its_codec_through_the_one_reader(cohort, tmp_path):
    from meddiff3d.pipelines.training_components import latent_diffusion_network

    root, _, codec = cohort
    with pytest.raises(InputError, match="^codec file .*codec.pt has no latent channel count in its meta"):
        latent_diffusion_network(codec=codec, network="test")  # the untrained pair's codec does not record it
    data = torch.load(codec, weights_only=True)
    data["meta"]["latent"] = {"channels": 3}
    torch.save(data, tmp_path / "codec.pt")
    assert latent_diffusion_network(codec=tmp_path / "codec.pt", network="test").in_channels == 3
    (tmp_path / "folder.pt").mkdir()
    (tmp_path / "notes.pt").write_text("codec: see the README")
    for path, message in [(root / "pair" / "diffusion.pt", "is a latent diffusion model file, not a codec"),
                          (tmp_path / "folder.pt", "is a directory, expected a file"),
                          (tmp_path / "notes.pt", "cannot be read: not a torch file"),
                          (tmp_path / "nope.pt", "does not exist")]:
        with pytest.raises(InputError, match=f"^codec file {path} {message}"):
            latent_diffusion_network(codec=path, network="test")


def test_dropout_uses_the_null_covariate():
    objective = DiffusionObjective(NoiseSchedule(), cond_dropout=1.0, null_cond=null_condition(4, "both"))
    batch = {"image": torch.zeros(3, 1, 2, 2, 2), "concat": torch.zeros(3, 4), "context": torch.zeros(3, 1, 4)}
    cond = objective.conditioning(batch, batch["image"])
    assert torch.equal(cond["concat"], torch.full((3, 4), NULL_COVARIATE))
    assert torch.equal(cond["context"], torch.full((3, 1, 4), NULL_COVARIATE))


def test_network_spec_checks_full_specs():
    spec = network_spec("test", 3, BRAIN_COVARIATES, "both", {"num_res_blocks": 2})
    assert spec["args"]["num_res_blocks"] == 2 and spec["args"]["in_channels"] == 7
    full = {"class": "monai.networks.nets.DiffusionModelUNet", "args": {**spec["args"], "in_channels": 5}}
    with pytest.raises(InputError, match="in_channels=5 do not fit"):
        network_spec(full, 3, BRAIN_COVARIATES, "both")


def test_train_then_generate(cohort, tmp_path):
    _, datalist, codec = cohort
    out = tmp_path / "models" / "diffusion.pt"
    kwargs = dict(out=out, network="test", max_iterations=2, batch_size=2, lr=1e-3, checkpoint_every=10,
                  device="cpu", amp="none", progress=False)
    summary = train_latent_diffusion(codec, datalist, tmp_path / "run", **kwargs)
    assert summary["iteration"] == 2 and not summary["latent_cache_reused"] and np.isfinite(summary["last_loss"])
    data = torch.load(out, weights_only=True)
    meta = data["meta"]
    assert data["format"] == "meddiff3d.inference/1" and "ema" in data
    assert meta["kind"] == "meddiff3d.latent_diffusion/1" and meta["prediction"] == "epsilon"
    assert meta["network"]["args"]["in_channels"] == 7 and meta["network"]["args"]["cross_attention_dim"] == 4
    assert meta["schedule"]["schedule"] == "scaled_linear_beta" and meta["schedule"]["beta_end"] == 0.0205
    cond = meta["conditioning"]
    assert cond["mode"] == "both" and cond["covariates"] == list(BRAIN_COVARIATES) and cond["null_value"] == -1.0
    assert cond["scaling"]["age"]["min"] == 40  # the datalist's scaling travels with the model
    assert meta["latent"]["shape"] == [3, 8, 12, 8] and meta["image"]["orientation"] == "RAS"
    assert meta["codec"]["fingerprint"] == load_model(codec, "codec").fingerprint
    assert meta["codec"]["latent_scale"] == pytest.approx(float(torch.load(codec, weights_only=True)["weights"]["latent_scale"]))
    json.dumps(meta)  # plain JSON
    # a second call on the finished run reuses the cache and trains no further
    again = train_latent_diffusion(codec, datalist, tmp_path / "run", **kwargs)
    assert again["latent_cache_reused"] and again["resumed_from"] == 2 and again["iteration"] == 2
    cov = {"sex": 0.0, "age": 0.0, "ventricular_volume": 0.5, "brain_volume": 0.5}
    (c,) = generate(codec, out, covariates=cov, steps=2, output_dir=tmp_path / "c", amp="none", progress=False)
    (u,) = generate(codec, out, covariates=None, steps=2, output_dir=tmp_path / "u", amp="none", progress=False)
    assert c.is_file() and u.is_file()
    assert json.loads((tmp_path / "u" / "sample_seed0.json").read_text())["covariates"] is None


class _Recorder(torch.nn.Module):
    """A stand-in U-Net that records its input and returns zeros of the latent's channel count."""

    def __init__(self, out_channels: int = 3) -> None:
        super().__init__()
        self.out_channels, self.inputs = out_channels, []

    def forward(self, x, timesteps, context=None):
        self.inputs.append(x.detach().clone())
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:], dtype=x.dtype)


def test_coordinates_reach_the_network_identically_in_training_and_sampling():
    from meddiff3d.diffusion import CoordinateChannels
    from meddiff3d.models.ldm import coordinate_wrapper, covariate_conditioning, latent_unet_spec
    from meddiff3d.pipelines.generation import build_denoiser

    assert coordinate_wrapper(False) is None and coordinate_wrapper({"conditioning": {}}) is None
    spec = latent_unet_spec(3, BRAIN_COVARIATES, "both", "test", coordinates=True)
    assert spec["args"]["in_channels"] == 3 + 4 + 3
    cov = torch.tensor([[1.0, 0.25, 0.4, 0.7]])
    cond = covariate_conditioning(cov, "both")
    trained = _Recorder()
    objective = DiffusionObjective(NoiseSchedule(), network_wrapper=coordinate_wrapper(True))
    objective(trained, {"image": torch.zeros(1, 3, 4, 6, 4), **cond})
    sampled = _Recorder()
    meta = {"conditioning": {"mode": "both", "coordinates": True}, "prediction": "epsilon",
            "schedule": NoiseSchedule().to_dict()}
    build_denoiser(sampled, meta)(torch.zeros(1, 3, 4, 6, 4), torch.tensor([500.0]), **cond)
    coords = CoordinateChannels()((4, 6, 4))
    for x in (trained.inputs[0], sampled.inputs[0]):
        assert x.shape == (1, 10, 4, 6, 4)
        torch.testing.assert_close(x[:, 3:7], cov[:, :, None, None, None].expand(1, 4, 4, 6, 4))
        torch.testing.assert_close(x[:, 7:], coords)  # coordinates after the covariates, in both paths


def test_train_with_coordinates_and_v_prediction_then_generate(cohort, tmp_path):
    _, datalist, codec = cohort
    out = tmp_path / "diffusion.pt"
    summary = train_latent_diffusion(codec, datalist, tmp_path / "run", out=out, network="test", max_iterations=2,
                                     batch_size=2, lr=1e-3, device="cpu", amp="none", progress=False,
                                     prediction="v", coordinates=True)
    assert summary["iteration"] == 2
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["prediction"] == "v" and meta["conditioning"]["coordinates"] is True
    assert meta["network"]["args"]["in_channels"] == 10
    (path,) = generate(codec, out, covariates=None, steps=2, output_dir=tmp_path / "u", amp="none", progress=False)
    assert path.is_file()


def test_the_models_own_sampling_is_saved_and_used_when_the_request_leaves_it_open(cohort, tmp_path):
    """``sampling`` given to the recipe lands in the meta (checked before any encoding); generation with sampler /
    steps None samples that way (the sidecar says so), an explicit sampler or steps still wins, and a model without
    it falls back to its schedule type's default."""
    from meddiff3d.pipelines.inferers import DEFAULT_SAMPLING, LatentDiffusionInferer, model_sampling

    _, datalist, codec = cohort
    kwargs = dict(network="test", max_iterations=1, batch_size=2, device="cpu", amp="none", progress=False)
    with pytest.raises(InputError, match="sampling: unknown sampler 'plms'"):
        train_latent_diffusion(codec, datalist, tmp_path / "bad", out=tmp_path / "bad.pt",
                               sampling={"sampler": "plms", "steps": 3}, **kwargs)
    assert not (tmp_path / "bad" / "latents").exists()  # refused before encoding
    out = tmp_path / "own.pt"
    train_latent_diffusion(codec, datalist, tmp_path / "run", out=out, sampling={"sampler": "dpmpp_2m", "steps": 3},
                           **kwargs)
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["sampling"] == {"sampler": "dpmpp_2m", "steps": 3, "spacing": None}
    (path,) = generate(codec, out, covariates=None, output_dir=tmp_path / "g", amp="none", progress=False)
    side = json.loads(path.with_name("sample_seed0.json").read_text())
    assert (side["sampler"], side["steps"], side["timestep_spacing"]) == ("dpmpp_2m", 3, "log_snr")
    explicit = LatentDiffusionInferer(meta, "ddim", None)
    assert (explicit.sampler, explicit.steps, explicit.spacing) == ("ddim", 3, "linspace")
    assert LatentDiffusionInferer(meta, None, 7).steps == 7
    bare = {k: v for k, v in meta.items() if k != "sampling"}
    assert model_sampling(bare) == DEFAULT_SAMPLING["NoiseSchedule"] == {"sampler": "ddim", "steps": 50}
    flow = {**bare, "schedule": {"type": "FlowSchedule", "num_train_timesteps": 1000}}
    assert model_sampling(flow)["sampler"] == "dpmpp_2m"
