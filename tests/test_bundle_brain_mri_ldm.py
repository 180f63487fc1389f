"""The brain_mri_ldm bundle: metadata, configs, user errors on the command line (the README's commands run as printed
in tests/test_bundle_readme_commands.py)."""

import re
from pathlib import Path

import pytest
import torch

from meddiff3d.pipelines.benchmark import untrained_pair

from bundle_testing import Bundle, assert_run_drives_the_components, check_generated

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
# The README's commands run as printed in tests/test_bundle_readme_commands.py; here: user errors on the command line.
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
    check_generated(out, 1, (32, 48, 32))
