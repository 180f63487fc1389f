"""Model-zoo compatibility: old-format (GenerativeModels key names) checkpoints of small networks of the anchor's classes
are converted and generate what the model-zoo MONAI loop generates from the same weights; a model trained without
conditioning dropout refuses guidance and unconditional sampling; clear errors for missing files and other
architectures. Plus a smoke run of the benchmark script."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler

from meddiff3d.errors import InputError
from meddiff3d.models.model_zoo import convert_model_zoo_ldm
from meddiff3d.pipelines.generation import generate

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "brain_mri_ldm"
SHAPE = (32, 48, 32)
COVARIATES = {"sex": 1.0, "age": 0.2, "ventricular_volume": 0.7, "brain_volume": 0.4}
# small networks of the anchor's classes (AutoencoderKL x4, DiffusionModelUNet with self- and cross-attention)
AE_ARGS = {"channels": [8, 16, 16], "num_res_blocks": 1, "norm_num_groups": 8}
UNET_ARGS = {"channels": [8, 16, 16], "attention_levels": [False, True, True], "num_head_channels": [0, 8, 16],
             "num_res_blocks": 1, "norm_num_groups": 8}


def old_key(key: str) -> str:
    """The GenerativeModels name of a current MONAI key: the reverse of ``load_old_state_dict``'s renames."""
    if "transformer_blocks" in key:
        key = key.replace(".out_proj.", ".to_out.0.")  # cross-attention output projection
    else:
        key = key.replace(".attn.out_proj.", ".proj_attn.").replace(".attn.to_", ".to_")  # spatial self-attention
    return key.replace("postconv", "conv")  # upsampling convolution


def small_networks() -> tuple[AutoencoderKL, DiffusionModelUNet]:
    torch.manual_seed(0)
    ae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=3, norm_eps=1e-6,
                       attention_levels=[False] * 3, with_encoder_nonlocal_attn=False,
                       with_decoder_nonlocal_attn=False, **AE_ARGS)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=7, out_channels=3, resblock_updown=True,
                              with_conditioning=True, cross_attention_dim=4, transformer_num_layers=1,
                              upcast_attention=True, **UNET_ARGS)
    with torch.no_grad():  # MONAI zero-initialises output layers: make the U-Net's output depend on its inputs
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ae.eval(), unet.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Old-format checkpoints of small networks, their conversion, and the networks themselves."""
    root = tmp_path_factory.mktemp("zoo")
    ae, unet = small_networks()
    old = {}
    for name, net in (("autoencoder.pt", ae), ("model.pt", unet)):
        state = {old_key(k): v for k, v in net.state_dict().items()}
        assert set(state) != set(net.state_dict())  # the renames apply to these architectures
        torch.save(state, root / name)
        old[name] = state
    codec, diffusion = convert_model_zoo_ldm(root / "autoencoder.pt", root / "model.pt", root / "converted",
                                             autoencoder_args=AE_ARGS, unet_args=UNET_ARGS, image_shape=SHAPE)
    return {"root": root, "ae": ae, "unet": unet, "codec": codec, "diffusion": diffusion}


def test_old_keys_round_trip(zoo):
    """Our reverse mapping is what MONAI's load_old_state_dict undoes: the converted weights are the originals."""
    from meddiff3d.models.loading import load_model

    loaded = load_model(zoo["codec"], "codec")
    codec, meta = loaded.network, loaded.meta
    assert float(codec.latent_scale) == 1.0 and float(codec.latent_shift) == 0.0
    for k, v in zoo["ae"].state_dict().items():
        assert torch.equal(codec.autoencoder.state_dict()[k], v), k
    diffusion = load_model(zoo["diffusion"], "latent_diffusion")
    unet, dmeta = diffusion.network, diffusion.meta
    for k, v in zoo["unet"].state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    assert dmeta["conditioning"]["covariates"] == ["sex", "age", "ventricular_volume", "brain_volume"]
    assert dmeta["conditioning"]["mode"] == "both" and dmeta["training"]["cond_dropout"] == 0
    assert dmeta["image"]["shape"] == list(SHAPE) and meta["image"]["spacing"] == [1.0, 1.0, 1.0]


def monai_model_zoo_loop(ae, unet, covariates, latent_shape, seed=0, steps=50):
    """The model-zoo sampler, written against MONAI: DDIMScheduler loop, concat + context, whole decode (fp32)."""
    scheduler = DDIMScheduler(1000, schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205,
                              clip_sample=False)
    scheduler.set_timesteps(num_inference_steps=steps)
    cond = torch.tensor([[covariates[k] for k in ("sex", "age", "ventricular_volume", "brain_volume")]])[:, None]
    x = torch.randn((1, *latent_shape), generator=torch.Generator().manual_seed(seed))
    concat = cond[:, 0, :, None, None, None].expand(-1, -1, *latent_shape[1:])
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(torch.cat((x, concat), 1), timesteps=torch.Tensor((t,)).long(), context=cond)
            x, _ = scheduler.step(eps, t, x)
        return ae.decode_stage_2_outputs(x)[0, 0].numpy()


def test_pipeline_equals_model_zoo_loop(zoo, tmp_path):
    """Same weights, noise, timesteps and stepping (spacing="monai"), fp32: equal to 1e-4 (measured ~1e-6)."""
    expected = monai_model_zoo_loop(zoo["ae"], zoo["unet"], COVARIATES, (3, 8, 12, 8))
    (path,) = generate(zoo["codec"], zoo["diffusion"], covariates=COVARIATES, steps=50, spacing="monai", amp="none",
                       output_dir=tmp_path, progress=False, device="cpu")
    ours = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    diff = np.abs(ours - expected)
    print(f"model-zoo loop vs generate (fp32): max |diff| {diff.max():.2e}, mean {diff.mean():.2e}, "
          f"volume std {expected.std():.3f}")
    assert expected.std() > 1e-3  # a non-trivial output
    assert diff.max() < 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"covariates": None}, "without conditioning dropout and cannot sample unconditionally"),
    ({"covariates": COVARIATES, "guidance_scale": 3.0}, "classifier-free guidance is undefined"),
    ({"covariates": COVARIATES, "guidance_scale": 0.0}, "classifier-free guidance is undefined"),
])
def test_no_dropout_model_refuses_guidance_and_unconditional(zoo, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        generate(zoo["codec"], zoo["diffusion"], steps=2, output_dir=tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_files(zoo, tmp_path):
    with pytest.raises(InputError, match="autoencoder checkpoint .*nope.pt does not exist"):
        convert_model_zoo_ldm(tmp_path / "nope.pt", zoo["root"] / "model.pt", tmp_path / "out")
    with pytest.raises(InputError, match="diffusion model checkpoint .*nope.pt does not exist"):
        convert_model_zoo_ldm(zoo["root"] / "autoencoder.pt", tmp_path / "nope.pt", tmp_path / "out")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot be read"):
        convert_model_zoo_ldm(tmp_path / "junk.pt", zoo["root"] / "model.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_architecture(zoo, tmp_path):
    """Small checkpoints against the default (anchor) architecture, and the two files swapped."""
    with pytest.raises(InputError, match="autoencoder checkpoint .* does not fit AutoencoderKL"):
        convert_model_zoo_ldm(zoo["root"] / "autoencoder.pt", zoo["root"] / "model.pt", tmp_path / "out")
    with pytest.raises(InputError, match="diffusion model checkpoint .* does not fit DiffusionModelUNet"):
        convert_model_zoo_ldm(zoo["root"] / "autoencoder.pt", zoo["root"] / "model.pt", tmp_path / "out",
                              autoencoder_args=AE_ARGS, image_shape=SHAPE)
    with pytest.raises(InputError, match="does not fit AutoencoderKL"):
        convert_model_zoo_ldm(zoo["root"] / "model.pt", zoo["root"] / "autoencoder.pt", tmp_path / "out",
                              autoencoder_args=AE_ARGS, unet_args=UNET_ARGS, image_shape=SHAPE)
    assert not (tmp_path / "out").exists()


def test_convert_cli(zoo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "meddiff3d", "convert-model-zoo",
                          str(zoo["root"] / "autoencoder.pt"), str(tmp_path / "missing.pt"), str(tmp_path / "o")],
                         capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 2
    assert out.stderr.strip().startswith("meddiff3d convert-model-zoo: error: diffusion model checkpoint")


def readme_section_commands(section: str) -> list[str]:
    text = (BUNDLE / "docs" / "README.md").read_text()
    body = re.search(rf"#+ {re.escape(section)}\n(.*?)(\n#+ |\Z)", text, re.S).group(1)
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", body, re.S) for line in block.splitlines()
            if line.strip()]


@pytest.mark.slow
def test_readme_model_zoo_commands(zoo, tmp_path):
    """The README's two commands: the conversion CLI (on the small old-format checkpoints, whose architecture the CLI
    does not know: it must refuse them clearly), then the bundle run of configs/inference_anchor.yaml on their
    conversion placed where that config looks (models/model_zoo)."""
    convert, run = readme_section_commands("Official model-zoo weights")
    argv = shlex.split(convert)
    assert argv[:4] == ["python", "-m", "meddiff3d", "convert-model-zoo"] and argv[-1] == "models/model_zoo"
    out = subprocess.run([sys.executable, *argv[1:4], str(zoo["root"] / "autoencoder.pt"), str(zoo["root"] / "model.pt"),
                          str(tmp_path / "models" / "model_zoo")], cwd=BUNDLE, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 2 and "does not fit AutoencoderKL" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "models" / "model_zoo").mkdir(parents=True, exist_ok=True)
    for path in (zoo["codec"], zoo["diffusion"]):
        shutil.copy(path, tmp_path / "models" / "model_zoo" / path.name)
    argv = shlex.split(run)
    assert argv[:4] == ["python", "-m", "monai.bundle", "run"] and "configs/inference_anchor.yaml" in run
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, *argv[1:], "--bundle_root", str(tmp_path), "--steps", "2",
                             "--output_dir", str(tmp_path / "outputs")], cwd=BUNDLE,
                            capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (nifti,) = (tmp_path / "outputs").glob("*.nii.gz")
    assert nib.load(nifti).shape == SHAPE
    side = json.loads(nifti.with_name(nifti.name.replace(".nii.gz", ".json")).read_text())
    assert side["covariates"] == {"sex": 0.0, "age": 0.1, "ventricular_volume": 0.2, "brain_volume": 0.4}
    result = subprocess.run([sys.executable, *argv[1:], "--bundle_root", str(tmp_path), "--steps", "2",
                             "--guidance_scale", "2", "--output_dir", str(tmp_path / "outputs2")], cwd=BUNDLE, capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, timeout=600)
    assert result.returncode == 2 and "error: " in result.stderr and "guidance" in result.stderr


@pytest.mark.slow
def test_benchmark_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_brain_ldm.py"), "--quick", "--out", str(out),
                           "--steps", "5", "--dpm-steps", "3", "--shape", "32", "32", "32"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"reference", "ours_ddim", "ours_ddim_tiled", "ours_dpmpp", "ours_dpmpp_tiled",
                                      "ours_fp32", "ours_fast", "ours_student"}
    fast, student = report["results"]["ours_fast"], report["results"]["ours_student"]
    assert (fast["sampler"], fast["steps"], fast["timestep_spacing"]) == ("unipc", 8, "time_quadratic")  # --fast
    assert (student["sampler"], student["steps"], student["timestep_spacing"]) == ("ddim", 4, "trailing")
    assert "unet_gflops" in student and student["denoiser_evaluations"] == 4
    assert "agreement_with_ours_ddim" in report["results"]["ours_ddim_tiled"]
    assert all(r["status"] == "ok" and r["peak_rss_mb"] > 0 for r in report["results"].values())
    assert report["results"]["ours_fp32"]["agreement_with_reference"]["max_abs_diff"] < 1e-4
