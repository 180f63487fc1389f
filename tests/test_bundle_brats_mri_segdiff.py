"""The brats_mri_segdiff bundle: metadata, configs, sliding-window inference and user errors on the command line (the
README's commands run as printed in tests/test_bundle_readme_commands.py)."""

import json
import re
from pathlib import Path

import pytest
import torch

from meddiff3d.models.segdiff import save_untrained_model

from bundle_testing import Bundle, assert_run_drives_the_components, check_segmented

BUNDLE_UNDER_TEST = Bundle("brats_mri_segdiff")
BUNDLE = BUNDLE_UNDER_TEST.path
parse, readme_commands, run_bundle = (BUNDLE_UNDER_TEST.parse, BUNDLE_UNDER_TEST.readme_commands,
                                       BUNDLE_UNDER_TEST.run)
INFERENCE_KEYS = ("model_path", "datalist", "section", "output_dir", "num_samples", "sampler", "steps", "batch_size",
                  "roi_size", "overlap", "sw_batch_size", "threshold", "seed", "device", "amp")


# ------------------------------------------------------------------------------------------------ static
def test_metadata_verifies_against_the_schema_offline():
    fmt = BUNDLE_UNDER_TEST.verified_metadata()["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 4
    assert fmt["outputs"]["pred"]["num_channels"] == 3


def test_bundle_files():
    for name in ("common.yaml", "train.yaml", "inference.yaml", "evaluate.yaml", "multi_gpu.yaml", "logging.conf",
                 "metadata.json"):
        assert (BUNDLE / "configs" / name).is_file(), name
    licence = (BUNDLE / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    assert (BUNDLE / "models").is_dir()
    assert "## Model card" in (BUNDLE / "docs" / "README.md").read_text()


@pytest.mark.parametrize("task, target", [
    ("train.yaml", "meddiff3d.pipelines.commands.train_segmentation_diffusion"),
    ("evaluate.yaml", "meddiff3d.pipelines.commands.evaluate_segmentation"),
])
def test_configs_name_factories_with_references(task, target):
    from pydoc import locate

    parser = parse("common.yaml", task)
    assert parser["run"]["_target_"] == target and callable(locate(target))
    assert parser.get_parsed_content("model_path") == "./models/model.pt"
    for value in parser["run"].values():  # literals or @references, no inline Python beyond one line
        assert not (isinstance(value, str) and value.startswith("$") and len(value) > 80), value


def test_inference_run_drives_its_components():
    parser = parse("common.yaml", "inference.yaml")
    assert_run_drives_the_components(parser, "meddiff3d.pipelines.segmentation.SegmentationEvaluator", INFERENCE_KEYS)
    assert parser["num_samples"] == 5 and parser["steps"] == 20 and parser["roi_size"] is None


def test_multi_gpu_overlay_takes_the_device_from_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    parser = parse("common.yaml", "train.yaml", "multi_gpu.yaml")
    assert parser.get_parsed_content("device") == torch.device("cuda", 3)
    assert parser["run"]["device"] == "@device"


def test_tiny_preset_and_data_config_merge():
    parser = parse("common.yaml", "train.yaml", "configs/data/synthetic_brats.yaml",
                   "configs/presets/tiny_cpu.yaml")
    assert parser.get_parsed_content("image_shape") == [32, 48, 32]
    assert parser.get_parsed_content("spacing") == [5.0, 5.0, 5.0]
    assert parser["datalist"]["_target_"] == "meddiff3d.pipelines.commands.synthetic_datalist"
    assert parser["datalist"]["kind"] == "brats" and parser["datalist"]["test_fraction"] > 0
    assert parser["segdiff_network"] == "tiny_cpu"


def test_readme_commands_name_existing_configs():
    commands = readme_commands("Segment") + readme_commands("Train") + readme_commands("Evaluate")
    assert len(commands) >= 6
    for cmd in commands:
        files = re.search(r"--config_file \"\[(.*?)\]\"", cmd).group(1)
        for name in re.findall(r"'([^']+)'", files):
            assert (BUNDLE / name).resolve().is_file(), f"{name} in: {cmd}"


# ------------------------------------------------------------------------------------------------ end to end
# The README's commands run as printed in tests/test_bundle_readme_commands.py; here: sliding-window inference and
# user errors on the command line, on an untrained model.
@pytest.mark.slow
def test_sliding_window_inference_and_bad_overrides_on_the_command_line(tmp_path):
    from meddiff3d.data.synthetic import write_cohort

    datalist = write_cohort("brats", tmp_path / "data", n=3, seed=1, shape=(32, 48, 32), source="procedural",
                            val_fraction=0.0, test_fraction=0.4, progress=False).datalist
    save_untrained_model(tmp_path / "models" / "model.pt", shape=(32, 48, 32), spacing=(5.0, 5.0, 5.0))
    infer = readme_commands("Segment")[0]
    out = tmp_path / "out"
    base = ("--datalist", str(datalist), "--output_dir", str(out), "--device", "cpu")
    cases = [
        (["--sampler", "plms"], "unknown sampler 'plms'; valid samplers: ddpm, ddim, dpmpp_2m, euler, heun"),
        (["--num_samples", "0"], "num_samples must be an integer >= 1, got 0"),
        (["--section", "validation"], "section 'validation' must be a non-empty list"),
        (["--model_path", str(tmp_path / "missing.pt")], "does not exist"),
    ]
    for extra, message in cases:
        result = run_bundle(infer, tmp_path, *base, *extra, timeout=300)
        assert result.returncode == 2, (extra, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert errors and message in errors[0], (extra, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        assert not out.exists(), extra
    result = run_bundle(infer, tmp_path, *base, "--num_samples", "2", "--steps", "2", "--roi_size", "[16,24,16]",
                        "--sampler", "dpmpp_2m", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    check_segmented(out, datalist, section=None)  # no --section: every section with items
    case = json.loads(Path(datalist).read_text())["test"][0]["id"]
    info = json.loads((out / case / f"{case}_segdiff.json").read_text())
    assert info["inference"]["sliding_window"]["roi_size"] == [16, 24, 16] and info["sampler"] == "dpmpp_2m"
