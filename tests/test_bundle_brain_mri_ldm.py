"""The brain_mri_ldm bundle: metadata, configs, the README's commands run end to end, user errors on the command line."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from meddiff3d.pipelines.benchmark import untrained_pair

from bundle_testing import Bundle, assert_run_drives_the_components

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_UNDER_TEST = Bundle("brain_mri_ldm")
BUNDLE = BUNDLE_UNDER_TEST.path
parse, readme_commands, run_bundle = (BUNDLE_UNDER_TEST.parse, BUNDLE_UNDER_TEST.readme_commands,
                                       BUNDLE_UNDER_TEST.run)
INFERENCE_KEYS = ("covariates", "num_samples", "sampler", "steps", "guidance_scale", "seed", "output_dir", "device")


# ------------------------------------------------------------------------------------------------ static
def test_metadata_verifies_against_the_schema_offline():
    meta = BUNDLE_UNDER_TEST.verified_metadata()
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["covariates"]["num_channels"] == 4
    assert fmt["outputs"]["image"]["spatial_shape"] == [160, 224, 160]


def test_bundle_files():
    for name in ("common.yaml", "train_autoencoder.yaml", "train_diffusion.yaml", "inference.yaml", "multi_gpu.yaml",
                 "logging.conf", "metadata.json"):
        assert (BUNDLE / "configs" / name).is_file(), name
    assert "Apache License" in (BUNDLE / "LICENSE").read_text() and "Version 2.0" in (BUNDLE / "LICENSE").read_text()
    assert (BUNDLE / "models").is_dir()
    assert "## Model card" in (BUNDLE / "docs" / "README.md").read_text()


@pytest.mark.parametrize("task, target", [
    ("train_autoencoder.yaml", "meddiff3d.pipelines.commands.train_autoencoder"),
    ("train_diffusion.yaml", "meddiff3d.pipelines.commands.train_latent_diffusion"),
])
def test_configs_name_factories_with_references(task, target):
    from pydoc import locate

    parser = parse("common.yaml", task)
    assert parser["run"]["_target_"] == target and callable(locate(target))
    assert parser.get_parsed_content("codec_path") == "./models/autoencoder.pt"
    for value in parser["run"].values():  # literals or @references, no inline Python beyond one line
        assert not (isinstance(value, str) and value.startswith("$") and len(value) > 80), value


def test_inference_run_drives_its_components():
    parser = parse("common.yaml", "inference.yaml")
    assert_run_drives_the_components(parser, "meddiff3d.pipelines.generation.GenerationEvaluator", INFERENCE_KEYS)


def test_multi_gpu_overlay_takes_the_device_from_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    parser = parse("common.yaml", "train_diffusion.yaml", "multi_gpu.yaml")
    assert parser.get_parsed_content("device") == torch.device("cuda", 3)
    assert parser["run"]["device"] == "@device"


def test_tiny_preset_and_data_config_merge():
    parser = parse("common.yaml", "train_diffusion.yaml", "configs/data/synthetic_healthy.yaml",
                   "configs/presets/tiny_cpu.yaml")
    assert parser.get_parsed_content("image_shape") == [32, 48, 32]
    assert parser["datalist"]["_target_"] == "meddiff3d.pipelines.commands.synthetic_datalist"
    assert parser["diffusion_network"] == "tiny_cpu"


def test_readme_commands_name_existing_configs():
    commands = readme_commands("Generate") + readme_commands("Train")
    assert len(commands) >= 7
    for cmd in commands:
        files = re.search(r"--config_file \"\[(.*?)\]\"", cmd).group(1)
        for name in re.findall(r"'([^']+)'", files):
            assert (BUNDLE / name).resolve().is_file(), f"{name} in: {cmd}"


# ------------------------------------------------------------------------------------------------ end to end
def check_outputs(out_dir, n, shape, affine=None):
    niftis = sorted(Path(out_dir).glob("*.nii.gz"))
    assert len(niftis) == n, sorted(p.name for p in Path(out_dir).iterdir())
    for path in niftis:
        img = nib.load(str(path))
        assert img.shape == tuple(shape) and img.get_data_dtype() == np.float32
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and not np.allclose(img.affine, np.eye(4))
        if affine is not None:
            np.testing.assert_allclose(img.affine, affine, atol=1e-4)
        stem = str(path)[: -len(".nii.gz")]
        assert Image.open(stem + ".png").size[0] > shape[0]
        assert json.loads(Path(stem + ".json").read_text())["file"] == path.name
    return niftis


@pytest.mark.slow
def test_readme_tiny_cpu_commands_run_end_to_end(tmp_path):
    """Train the autoencoder, train the diffusion model, generate: the README's CPU commands, one iteration each."""
    train_ae, train_ldm, infer = readme_commands("On a CPU in minutes (tiny preset, synthetic data)")
    data = ("--synthetic_n", "6")
    result = run_bundle(train_ae, tmp_path, *data, "--autoencoder_max_iterations", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "autoencoder.pt").is_file()
    result = run_bundle(train_ldm, tmp_path, *data, "--diffusion_max_iterations", "1", "--diffusion_batch_size", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    meta = torch.load(tmp_path / "models" / "model.pt", weights_only=True)["meta"]
    assert meta["network"]["args"]["channels"] == [32, 64, 64]  # the tiny_cpu U-Net
    result = run_bundle(infer, tmp_path, "--steps", "2", "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / "out", 2, (32, 48, 32), affine=np.asarray(meta["image"]["affine"]))
    # unconditional sampling and another sampler from the same model, on the command line
    result = run_bundle(infer, tmp_path, "--steps", "3", "--sampler", "dpmpp_2m", "--covariates", "null",
                        "--num_samples", "1", "--output_dir", str(tmp_path / "uncond"))
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = check_outputs(tmp_path / "uncond", 1, (32, 48, 32))
    side = json.loads(Path(str(path)[: -len(".nii.gz")] + ".json").read_text())
    assert side["covariates"] is None and side["sampler"] == "dpmpp_2m" and side["timestep_spacing"] == "log_snr"


@pytest.mark.slow
def test_bad_overrides_fail_cleanly_and_write_nothing(tmp_path):
    untrained_pair(tmp_path / "models")
    (tmp_path / "models" / "codec.pt").rename(tmp_path / "models" / "autoencoder.pt")
    (tmp_path / "models" / "diffusion.pt").rename(tmp_path / "models" / "model.pt")
    infer = readme_commands("Generate")[0]
    out = tmp_path / "out"
    cases = [
        (["--sampler", "plms"], "unknown sampler 'plms'; valid samplers: ddpm, ddim, dpmpp_2m, euler, heun"),
        (["--covariates#age", "1.5"], "age=1.5 is outside [0, 1]"),
        (["--covariates", "{'sex': 1, 'age': 0.5, 'ventricular_volume': 0.3, 'brain_volume': 0.6, 'iq': 0.5}"],
         "unknown covariate(s) ['iq']"),
        (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    ]
    for extra, message in cases:
        result = run_bundle(infer, tmp_path, "--output_dir", str(out), *extra, timeout=300)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors and message in errors[0], (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not out.exists(), extra
    result = run_bundle(infer, tmp_path, "--output_dir", str(out), "--steps", "2", "--num_samples", "1", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    check_outputs(out, 1, (32, 48, 32))
