"""The brain_mri_anomaly_ldm bundle: metadata, configs, a user error on the command line (the README's commands run
as printed in tests/test_bundle_readme_commands.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bundle_testing import Bundle, assert_run_drives_the_components, script_module

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_UNDER_TEST = Bundle("brain_mri_anomaly_ldm")
BUNDLE = BUNDLE_UNDER_TEST.path
parse, readme_commands, run_bundle = (BUNDLE_UNDER_TEST.parse, BUNDLE_UNDER_TEST.readme_commands,
                                       BUNDLE_UNDER_TEST.run)
pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = {"train_autoencoder.yaml": "train_autoencoder", "train_diffusion.yaml": "train_latent_diffusion",
         "calibrate.yaml": "calibrate_anomaly", "evaluate.yaml": "evaluate_anomaly"}


# ------------------------------------------------------------------------------------------------ static
def test_metadata_verifies_against_the_schema_offline():
    meta = BUNDLE_UNDER_TEST.verified_metadata()
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [160, 224, 160]


def test_bundle_files():
    for name in ("common.yaml", *TASKS, "inference.yaml", "multi_gpu.yaml", "demo_models.yaml", "vq_models.yaml",
                 "tiny_cpu.yaml", "logging.conf", "metadata.json", "presets/demo.yaml", "presets/demo_vq.yaml"):
        assert (BUNDLE / "configs" / name).is_file(), name
    licence = (BUNDLE / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert (BUNDLE / "models").is_dir() and "## Model card" in (BUNDLE / "docs" / "README.md").read_text()


@pytest.mark.parametrize("task, target", sorted(TASKS.items()))
def test_configs_name_factories_with_references(task, target):
    from pydoc import locate

    parser = parse("common.yaml", task)
    target = f"meddiff3d.pipelines.commands.{target}"
    assert parser["run"]["_target_"] == target and callable(locate(target))
    for value in parser["run"].values():  # literals or @references, no inline Python beyond one line
        assert not (isinstance(value, str) and value.startswith("$") and len(value) > 80), value
    assert parser.get_parsed_content("calibration_path") == "./models/calibration.json"


def test_inference_run_drives_its_components():
    parser = parse("common.yaml", "inference.yaml")
    assert_run_drives_the_components(parser, "meddiff3d.pipelines.anomaly.AnomalyEvaluator",
                                     ("inputs", "section", "output_dir", "check_models", "calibration_path", "device",
                                      "amp"))


def test_defaults_vq_autoencoder_unconditional_diffusion_and_detector():
    assert parse("common.yaml", "train_autoencoder.yaml")["autoencoder_kind"] == "vq"
    run = parse("common.yaml", "train_diffusion.yaml")["run"]
    assert run["conditioning"] == "none" and run["covariates"] == []
    from meddiff3d.anomaly import DetectorSettings

    detector = parse("common.yaml", "calibrate.yaml").get_parsed_content("detector")
    assert DetectorSettings.from_dict(detector).method == "latent_inpainting"
    tiny = parse("common.yaml", "calibrate.yaml", "configs/presets/tiny_cpu.yaml", "tiny_cpu.yaml")
    assert DetectorSettings.from_dict(tiny.get_parsed_content("detector")).start_steps == [250, 400]


def test_overlays_multi_gpu_and_demo_models(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "2")
    parser = parse("common.yaml", "train_diffusion.yaml", "multi_gpu.yaml")
    assert parser.get_parsed_content("device") == torch.device("cuda", 2) and parser["run"]["device"] == "@device"
    demo = parse("common.yaml", "inference.yaml", "demo_models.yaml")
    codec = Path(demo.get_parsed_content("codec_path"))
    assert (BUNDLE / codec).parent.resolve() == (BUNDLE / "models").resolve()
    assert demo.get_parsed_content("calibration_path") == "./models/demo/calibration.json"


def test_vq_overlay_names_the_shipped_vq_pair_and_its_calibration():
    """configs/vq_models.yaml swaps in models/vq/: a VQ-VAE codec, an unconditional U-Net on its latents, and the
    calibrations made with exactly these files (the sha256 detection checks)."""
    from meddiff3d.anomaly.calibration import load_calibration
    from meddiff3d.pipelines.anomaly import check_calibrated_models

    parser = parse("common.yaml", "inference.yaml", "vq_models.yaml")
    files = {key: BUNDLE / parser.get_parsed_content(key)
             for key in ("codec_path", "diffusion_path", "calibration_path", "baseline_calibration_path")}
    assert {f.parent.resolve() for f in files.values()} == {(BUNDLE / "models" / "vq").resolve()}
    codec = torch.load(files["codec_path"], map_location="cpu", weights_only=True)["meta"]
    assert codec["kind"] == "vq" and codec["network"]["class"] == "monai.networks.nets.VQVAE"
    diffusion = torch.load(files["diffusion_path"], map_location="cpu", weights_only=True)["meta"]
    assert diffusion["conditioning"]["mode"] == "none"
    assert diffusion["latent"]["shape"][0] == codec["network"]["args"]["embedding_dim"]
    for key in ("calibration_path", "baseline_calibration_path"):  # detection's own check (raises on a mismatch)
        calibration = load_calibration(files[key])
        assert calibration.models["codec"] is not None, key
        check_calibrated_models(calibration, files["codec_path"], files["diffusion_path"], key)
    assert load_calibration(files["calibration_path"]).models["diffusion"] is not None  # the detector names its U-Net


@pytest.mark.parametrize("pair, overlay", [("kl", "demo_models.yaml"), ("vq", "vq_models.yaml")])
def test_demo_calibration_script_calibrates_the_files_the_configs_load(pair, overlay, capsys):
    """scripts/calibrate_anomaly_demo.py --pair: the codec and U-Net the bundle's configs load with that pair's
    overlay, its calibration written where the overlay reads it; explicit paths win, and other models need --out
    (never the shipped pair's folder by default)."""
    script = script_module("calibrate_anomaly_demo")
    args = script.parse_args(["--pair", pair])
    parser = parse("common.yaml", "inference.yaml", overlay)
    for key, path in (("codec_path", args.codec), ("diffusion_path", args.diffusion),
                      ("calibration_path", args.out / "calibration.json")):
        assert (BUNDLE / parser.get_parsed_content(key)).resolve() == path.resolve(), key
    assert script.parse_args(["--pair", pair, "--out", "elsewhere"]).out == Path("elsewhere")
    with pytest.raises(SystemExit) as stop:
        script.parse_args(["--pair", pair, "--codec", "other.pt"])
    assert stop.value.code == 2 and "--out" in capsys.readouterr().err


def test_readme_commands_name_existing_configs():
    sections = ("Detect", "Calibrate", "Evaluate", "Train", "On a CPU in minutes (tiny preset, synthetic data)")
    commands = sum((readme_commands(s) for s in sections), [])
    assert len(commands) >= 14
    for cmd in commands:
        files = re.search(r"--config_file \"\[(.*?)\]\"", cmd).group(1)
        for name in re.findall(r"'([^']+)'", files):
            assert (BUNDLE / name).resolve().is_file(), f"{name} in: {cmd}"


# ------------------------------------------------------------------------------------------------ end to end
# The README's commands run as printed in tests/test_bundle_readme_commands.py; here: a user error on the command line.
@pytest.mark.slow
def test_missing_input_fails_cleanly_and_writes_nothing(tmp_path):
    """Bad input on the command line, in a copy with the shipped weights and calibration: one error line, exit
    status 2, nothing written."""
    root = BUNDLE_UNDER_TEST.copy_to(tmp_path / "bundle", models=True)
    detect = readme_commands("On a CPU in minutes (tiny preset, synthetic data)")[3]
    out = root / "bad"
    result = run_bundle(detect, root, "--inputs", f"['{root / 'missing.nii.gz'}']", "--output_dir", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "missing.nii.gz" in errors[0] and "Traceback" not in result.stderr
    assert not out.exists()
