"""Latent diffusion model: U-Net specs, covariate conditioning, generation (files, geometry, guidance, pairing, errors).

Models here are untrained tiny pairs (``untrained_pair``: AutoencoderKL [8, 16, 16] x4 + the "test" U-Net) on
32x48x32 volumes, so every test runs in a second or two.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from meddiff3d.diffusion import NoiseSchedule, initial_noise, sample, schedule_from_dict
from meddiff3d.engine.checkpoint import build_network
from meddiff3d.errors import InputError
from meddiff3d.models.ldm import (
    BRAIN_COVARIATES,
    NULL_COVARIATE,
    UNET_PRESETS,
    covariate_conditioning,
    covariate_vector,
    build_denoiser,
    check_guidance_support,
    latent_unet_spec,
    load_latent_diffusion,
    model_conditioning,
    null_condition,
)
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.benchmark import untrained_pair
from meddiff3d.pipelines.generation import generate
from meddiff3d.utils.io import PREVIEW_INFO_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


COV = {"sex": 1.0, "age": 0.25, "ventricular_volume": 0.4, "brain_volume": 0.7}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return untrained_pair(tmp_path_factory.mktemp("pair"), latent_scale=1.7)


def _gen(pair, out, **kw):
    kw = {"steps": 3, "amp": "none", "device": "cpu", "progress": False, "covariates": COV, **kw}
    return generate(*pair, output_dir=out, **kw)


def _load(path):
    return nib.load(str(path)).get_fdata(dtype=np.float32)


# ------------------------------------------------------------------------------------------------ specs
@pytest.mark.parametrize("mode, in_ch, cross", [("both", 7, 4), ("concat", 7, None), ("crossattn", 3, 4),
                                                ("none", 3, None)])
def test_unet_spec_derives_channels_from_conditioning(mode, in_ch, cross):
    spec = latent_unet_spec(3, BRAIN_COVARIATES, mode, "test")
    args = spec["args"]
    assert spec["class"] == "monai.networks.nets.DiffusionModelUNet"
    assert args["in_channels"] == in_ch and args["out_channels"] == 3
    assert args["with_conditioning"] == (cross is not None) and args.get("cross_attention_dim") == cross
    net = build_network(spec)
    x = torch.randn(2, 3, 4, 4, 4)
    cond = covariate_conditioning(torch.rand(2, 4), mode)
    if "concat" in cond:
        x = torch.cat([x, cond.pop("concat")[..., None, None, None].expand(-1, -1, 4, 4, 4)], 1)
    assert net(x, timesteps=torch.tensor([1.0, 500.0]), **cond).shape == (2, 3, 4, 4, 4)


def test_anchor_and_tiny_presets():
    anchor = latent_unet_spec(3, BRAIN_COVARIATES, "both", "anchor")["args"]
    assert anchor["channels"] == [256, 512, 768] and anchor["attention_levels"] == [False, True, True]
    assert anchor["num_head_channels"] == [0, 512, 768] and anchor["num_res_blocks"] == 2
    assert anchor["resblock_updown"] and anchor["upcast_attention"] and anchor["transformer_num_layers"] == 1
    assert anchor["in_channels"] == 7 and anchor["cross_attention_dim"] == 4
    tiny = build_network(latent_unet_spec(3, BRAIN_COVARIATES, "both", "tiny_cpu"))
    assert 2.5e6 < sum(p.numel() for p in tiny.parameters()) < 4e6
    assert latent_unet_spec(3, ["age"], "both", "test", num_res_blocks=2)["args"]["num_res_blocks"] == 2
    with pytest.raises(InputError, match="unknown conditioning mode 'bogus'"):
        latent_unet_spec(3, ["age"], "bogus")
    with pytest.raises(InputError, match="unknown U-Net preset"):
        latent_unet_spec(3, ["age"], "both", "huge")
    assert set(UNET_PRESETS) >= {"anchor", "tiny_cpu", "test"}


def test_conditioning_and_null_condition():
    cov = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    both = covariate_conditioning(cov, "both")
    assert both["concat"].shape == (1, 4) and both["context"].shape == (1, 1, 4)
    assert covariate_conditioning(cov, "none") == {}
    null = null_condition(4, "both")
    assert NULL_COVARIATE < 0  # outside [0, 1]: distinguishable from sex 0 / age 0
    assert torch.equal(null["concat"], torch.full((1, 4), NULL_COVARIATE))
    assert torch.equal(null["context"], torch.full((1, 1, 4), NULL_COVARIATE))
    assert torch.equal(covariate_vector(COV, BRAIN_COVARIATES), torch.tensor([1.0, 0.25, 0.4, 0.7]))
    for bad, message in [({**COV, "age": 1.5}, "age=1.5 is outside"), ({**COV, "age": float("nan")}, "outside"),
                         ({**COV, "height": 0.5}, "unknown covariate.*height"), ({"age": 0.5}, "missing"),
                         ({**COV, "age": "old"}, "not a number")]:
        with pytest.raises(InputError, match=message):
            covariate_vector(bad, BRAIN_COVARIATES)


# ------------------------------------------------------------------------------------------------ generation
def test_generate_writes_nifti_preview_and_sidecar(pair, tmp_path):
    paths = _gen(pair, tmp_path / "out", num_samples=2, seed=3)
    assert [p.name for p in paths] == ["sample_seed3.nii.gz", "sample_seed4.nii.gz"]
    meta = torch.load(pair[1], weights_only=True)["meta"]
    img = nib.load(str(paths[0]))
    assert img.shape == (32, 48, 32) and img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, meta["image"]["affine"], atol=1e-4)
    assert not np.allclose(img.affine, np.eye(4)) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert np.allclose(img.header.get_zooms(), (5, 5, 5))
    assert np.isfinite(img.get_fdata()).all()
    png = Image.open(paths[0].with_suffix("").with_suffix(".png"))
    assert png.size[0] > 32 * 2 and png.mode == "RGB"
    layout = json.loads(png.text[PREVIEW_INFO_KEY])  # views >= 256 px, one mm scale, the convention on the image
    assert all(min(r - left, b - t) >= 256 for left, t, r, b in layout["views"].values())
    assert layout["convention"] == "radiological"
    side = json.loads(paths[0].with_suffix("").with_suffix(".json").read_text())
    assert side["covariates"] == COV and side["seed"] == 3 and side["sampler"] == "ddim" and side["steps"] == 3
    assert side["models"]["diffusion"]["sha256"] and side["models"]["codec"]["sha256"]
    assert side["guidance_scale"] == 1.0 and side["conditional"]
    assert sorted(f.name for f in (tmp_path / "out").iterdir() if f.name.startswith(".")) == []  # no temp files
    # sample i of a batch is reproducible alone from seed + i
    (again,) = _gen(pair, tmp_path / "again", seed=4)
    np.testing.assert_allclose(_load(again), _load(paths[1]), atol=1e-5)


def test_generation_shows_sampling_and_decoding_progress(pair, tmp_path, capsys):
    """Two bars: denoising steps (2 samples x 3 steps) and decoder blocks of each decode (tiled: per tile)."""
    from meddiff3d.models.codec import decode_steps

    _gen(pair, tmp_path / "out", num_samples=2, progress=True, decode_tile=(4, 6, 4))
    err = capsys.readouterr().err
    codec = load_model(pair[0], "codec").network
    latent = torch.load(pair[1], weights_only=True)["meta"]["latent"]["shape"]
    blocks = 2 * decode_steps(codec, (1, *latent), (4, 6, 4))  # two decodes of one latent each
    assert "6/6" in err and "decoding 2 volume(s)" in err and f"{blocks}/{blocks}" in err
    assert blocks > 2 * len(codec.autoencoder.decoder.blocks)  # tiled: every tile counts


def test_conditional_unconditional_and_guidance_from_one_model(pair, tmp_path):
    cond = _load(_gen(pair, tmp_path / "c")[0])
    uncond = _load(_gen(pair, tmp_path / "u", covariates=None)[0])
    assert np.isfinite(uncond).all() and not np.allclose(cond, uncond, atol=1e-4)
    # guidance 1 is the conditional model: the batched guidance path at w -> 1 agrees with the plain conditional pass
    near_one = _load(_gen(pair, tmp_path / "g1", guidance_scale=1.0 + 1e-6)[0])
    np.testing.assert_allclose(near_one, cond, atol=1e-4)
    # guidance 0 is the unconditional model (the null condition, every covariate -1)
    zero = _load(_gen(pair, tmp_path / "g0", guidance_scale=0.0)[0])
    np.testing.assert_allclose(zero, uncond, atol=1e-4)
    strong = _load(_gen(pair, tmp_path / "g3", guidance_scale=3.0)[0])
    assert not np.allclose(strong, cond, atol=1e-4)


def test_guidance_needs_conditional_sampling(pair, tmp_path):
    """guidance_scale != 1 without a condition (an unconditional model, or covariates null) is refused, never
    ignored; guidance_scale 1 samples unconditionally as before."""
    unconditional = untrained_pair(tmp_path / "uncond", conditioning="none")
    with pytest.raises(InputError, match="^guidance_scale=3 needs conditional sampling: the diffusion model "
                                         ".*uncond/diffusion.pt is unconditional; leave guidance_scale at 1$"):
        _gen(unconditional, tmp_path / "u", covariates=None, guidance_scale=3.0)
    with pytest.raises(InputError, match="^guidance_scale=0 needs conditional sampling: covariates are null \\(give "
                                         "every covariate: sex, age, ventricular_volume, brain_volume\\); leave"):
        _gen(pair, tmp_path / "c", covariates=None, guidance_scale=0.0)
    assert not (tmp_path / "u").exists() and not (tmp_path / "c").exists()
    (path,) = _gen(unconditional, tmp_path / "ok", covariates=None)
    assert np.isfinite(_load(path)).all()


def test_check_guidance_support_rules():
    """The callers' conventions: generation passes (conditional = covariates given, its guidance_scale), anomaly
    detection (conditional=False, guidance_scale=1)."""
    meta = {"conditioning": {"mode": "both", "covariates": ["age"]}, "training": {"cond_dropout": 0.1}}
    no_dropout = {**meta, "training": {"cond_dropout": 0}}
    unconditional = {"conditioning": {"mode": "none", "covariates": []}, "training": {}}
    for m in (meta, unconditional):
        check_guidance_support(m, "m.pt", conditional=False, guidance_scale=1.0)  # anomaly detection's call
    check_guidance_support(meta, "m.pt", conditional=True, guidance_scale=3.0)
    check_guidance_support(no_dropout, "m.pt", conditional=True, guidance_scale=1.0)
    folded = {**meta, "distillation": {"guidance_scale": 2.0}}
    check_guidance_support(folded, "m.pt", conditional=True, guidance_scale=1.0)
    for m, conditional, scale, message in [
        (folded, True, 3.0, "m.pt was distilled with guidance 2 folded in; sample it with guidance_scale 1"),
        (unconditional, False, 2.0, ("guidance_scale=2 needs conditional sampling: the diffusion model m.pt is "
                                     "unconditional")),
        (meta, False, 0.5, "guidance_scale=0.5 needs conditional sampling: covariates are null"),
        (no_dropout, False, 1.0, "without conditioning dropout and cannot sample unconditionally"),
        (no_dropout, False, 3.0, "without conditioning dropout and cannot sample unconditionally"),
        (no_dropout, True, 3.0, "classifier-free guidance is undefined for it; use guidance_scale 1 \\(got 3\\)"),
    ]:
        with pytest.raises(InputError, match=message):
            check_guidance_support(m, "m.pt", conditional=conditional, guidance_scale=scale)


def load_models(codec_path, diffusion_path, amp_dtype=None):
    codec, diffusion = load_latent_diffusion(codec_path, diffusion_path, dtype=amp_dtype)
    return diffusion.network, diffusion.meta, codec.network


def test_guidance_wrapper_combination_on_one_step(pair):
    network, meta, _ = load_models(*pair)
    x = initial_noise([0], meta["latent"]["shape"], torch.device("cpu"))
    t = torch.tensor([700.0])
    cov = covariate_vector(COV, BRAIN_COVARIATES)
    c = build_denoiser(network, meta)(x, t, **model_conditioning(meta, cov, 1, x.device))
    u = build_denoiser(network, meta)(x, t, **model_conditioning(meta, None, 1, x.device))
    g = build_denoiser(network, meta, guidance_scale=2.5)(x, t, **model_conditioning(meta, cov, 1, x.device))
    torch.testing.assert_close(g, u + 2.5 * (c - u), atol=5e-4, rtol=1e-3)  # batch of 2 vs 1: rounding


def test_bf16_inference_network_matches_autocast_of_the_float32_weights(pair):
    """load_latent_diffusion(dtype=bf16) stores conv/linear weights in bf16 and channels-last: the denoiser's output equals
    autocast over the float32 network up to bf16 rounding of a different summation order."""
    from meddiff3d.engine.precision import Autocast

    network32, meta, _ = load_models(*pair)
    network16, _, _ = load_models(*pair, amp_dtype=torch.bfloat16)
    for p in network32.parameters():
        p.data.normal_(0, 0.05)  # the untrained U-Net's output layer is zero
    state = network32.state_dict()
    network16.load_state_dict({k: v.to(network16.state_dict()[k].dtype) for k, v in state.items()})
    conv = next(m for m in network16.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    x = initial_noise([0], [7, *meta["latent"]["shape"][1:]], torch.device("cpu"))
    t, ctx = torch.tensor([600]), torch.rand(1, 1, 4)
    with torch.no_grad():
        reference = Autocast(network32, torch.bfloat16)(x, timesteps=t, context=ctx)
        got = Autocast(network16, torch.bfloat16)(x, timesteps=t, context=ctx)
    assert got.dtype == torch.float32 and got.is_contiguous() and reference.abs().max() > 0.05
    torch.testing.assert_close(got, reference, atol=0.02 * float(reference.abs().max()), rtol=0)


def test_latent_scale_travels_with_the_codec_file(pair, tmp_path):
    first = _load(_gen(pair, tmp_path / "a")[0])
    codec_file = torch.load(pair[0], weights_only=True)
    assert float(codec_file["weights"]["latent_scale"]) == pytest.approx(1.7)
    codec_file["weights"]["latent_scale"] = torch.tensor(3.0)
    changed = tmp_path / "codec_rescaled.pt"
    torch.save(codec_file, changed)
    loaded = load_model(changed, "codec").network
    assert float(loaded.latent_scale) == 3.0  # read from the file, never recomputed
    with pytest.raises(InputError, match="not the codec the diffusion model .* was trained with"):
        _gen((changed, pair[1]), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    second = _load(_gen((changed, pair[1]), tmp_path / "b", check_pair=False)[0])
    assert not np.allclose(first, second, atol=1e-4)
    # same latents, only the scale differs: decoding z / 3.0 instead of z / 1.7
    network, meta, codec = load_models(*pair)
    z = sample(build_denoiser(network, meta), initial_noise([0], meta["latent"]["shape"], torch.device("cpu")),
               schedule_from_dict(meta["schedule"]), steps=3, cond=model_conditioning(meta, covariate_vector(COV, BRAIN_COVARIATES), 1,
                                                              torch.device("cpu")))
    np.testing.assert_allclose(loaded.decode(z)[0, 0].numpy(), second, atol=1e-4)


@pytest.mark.parametrize("override, message", [
    ({"sampler": "plms"}, "unknown sampler 'plms'; valid samplers: ddpm, ddim, dpmpp_2m"),
    ({"covariates": {**COV, "age": 1.2}}, "age=1.2 is outside \\[0, 1\\]"),
    ({"covariates": {**COV, "weight": 0.2}}, "unknown covariate.*'weight'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"steps": 2000}, "steps must be in \\[1, 1000\\]"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"guidance_scale": -1}, "guidance_scale must be a finite number >= 0"),
    ({"amp": "fp8"}, "unknown amp 'fp8'"),
    ({"covariates": "age=3"}, "age=3 is outside \\[0, 1\\]"),  # the text form name=value, checked like a mapping
    ({"covariates": "age"}, "not a mapping"),
])
def test_bad_requests_fail_before_writing(pair, tmp_path, override, message):
    with pytest.raises(InputError, match=message):
        _gen(pair, tmp_path / "out", **override)
    assert not (tmp_path / "out").exists()


def test_missing_and_foreign_model_files(pair, tmp_path):
    with pytest.raises(InputError, match="diffusion model file .*nope.pt does not exist"):
        _gen((pair[0], tmp_path / "nope.pt"), tmp_path / "out")
    with pytest.raises(InputError, match="codec file .*nope.pt does not exist"):
        _gen((tmp_path / "nope.pt", pair[1]), tmp_path / "out")
    other = untrained_pair(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="not the codec"):
        _gen((other[0], pair[1]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("entry", ["codec", "image", "latent", "conditioning", "schedule"])
def test_diffusion_file_without_a_meta_entry_is_refused(pair, tmp_path, entry):
    data = torch.load(pair[1], weights_only=True)
    data["meta"].pop(entry)
    torch.save(data, tmp_path / "model.pt")
    with pytest.raises(InputError, match=f"^diffusion model file .*model.pt is damaged or incomplete: its meta has no "
                                         f"{entry} entry$"):
        _gen((pair[0], tmp_path / "model.pt"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_samplers_and_tiled_decoding(pair, tmp_path):
    for sampler in ("ddpm", "dpmpp_2m", "euler", "heun"):
        (path,) = _gen(pair, tmp_path / sampler, sampler=sampler, steps=4)
        assert np.isfinite(_load(path)).all()
    whole = _load(_gen(pair, tmp_path / "whole")[0])
    tiled = _load(_gen(pair, tmp_path / "tiled", decode_tile=[6, 8, 6])[0])
    assert tiled.shape == whole.shape and np.isfinite(tiled).all()
    # an untrained autoencoder's GroupNorm statistics differ per tile: only roughly equal to the whole pass
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.8


def test_bf16_autocast_stays_close_to_float32(pair, tmp_path):
    fp32 = _load(_gen(pair, tmp_path / "fp32")[0])
    bf16 = _load(_gen(pair, tmp_path / "bf16", amp="bf16")[0])
    side = json.loads((tmp_path / "bf16" / "sample_seed0.json").read_text())
    assert side["amp"] == "bfloat16"
    assert np.abs(bf16 - fp32).max() < 0.1 * (np.abs(fp32).max() + 1e-3)


def test_schedule_in_meta_is_the_anchor(pair):
    meta = torch.load(pair[1], weights_only=True)["meta"]
    schedule = NoiseSchedule.from_dict(meta["schedule"])
    assert (schedule.schedule, schedule.beta_start, schedule.beta_end) == ("scaled_linear_beta", 0.0015, 0.0205)
    assert meta["conditioning"]["null_value"] == NULL_COVARIATE
    assert meta["conditioning"]["covariates"] == list(BRAIN_COVARIATES)
    assert meta["latent"]["shape"] == [3, 8, 12, 8]
