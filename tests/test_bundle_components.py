"""The MONAI standard components of the four bundles' inference configs: ConfigWorkflow's infer properties,
``network_def`` with the shipped weights, each ``configs/inference.yaml`` run alone, the components equal to the
pipeline, and the sub-networks TorchScript can hold (decoder, segmentation denoiser)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_testing import ROOT

BUNDLES = ROOT / "bundles"
LDM, SEG, ANOMALY, IMAGE = (BUNDLES / n for n in ("brain_mri_ldm", "brats_mri_segdiff", "brain_mri_anomaly_ldm",
                                                   "medical_2d_ddpm"))
#: every inference config a README runs with shipped weights: (bundle, config files)
INFERENCE_CONFIGS = [
    (LDM, ["inference.yaml"]), (LDM, ["common.yaml", "inference.yaml"]),
    (SEG, ["inference.yaml"]), (SEG, ["common.yaml", "inference.yaml"]),
    (ANOMALY, ["inference.yaml"]), (ANOMALY, ["common.yaml", "inference.yaml"]),
    (ANOMALY, ["common.yaml", "inference.yaml", "demo_models.yaml"]),
    (IMAGE, ["inference.yaml"]), (IMAGE, ["common.yaml", "inference.yaml"]),
    (IMAGE, ["common.yaml", "reconstruct.yaml"]),
]
MAIN_NETWORK = {LDM: "model.pt", SEG: "model.pt", ANOMALY: "model.pt", IMAGE: "model.pt"}
pytestmark = pytest.mark.usefixtures("one_thread")


def workflow(bundle: Path, configs, **override):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(config_file=[str(bundle / "configs" / c) for c in configs], workflow_type="infer",
                        logging_file=False, **{"bundle_root": str(bundle), "device": "cpu", "amp": "none",
                                               **override})
    wf.initialize()
    return wf


def ids(case):
    return f"{case[0].name}:{'+'.join(c.removesuffix('.yaml') for c in case[1])}"


# ------------------------------------------------------------------------------------------------ properties
@pytest.mark.parametrize("case", INFERENCE_CONFIGS, ids=ids)
def test_infer_properties_pass_with_the_shipped_weights(case):
    bundle, configs = case
    wf = workflow(bundle, configs)
    assert wf.check_properties() == []
    assert callable(wf.evaluator.run)
    from monai.inferers import Inferer

    assert isinstance(wf.inferer, Inferer)  # the anomaly bundle's too (the calibrated Detector)


@pytest.mark.parametrize("bundle", [LDM, SEG, ANOMALY, IMAGE], ids=lambda b: b.name)
def test_network_def_holds_the_weights_of_models_model_pt(bundle):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.yaml"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    assert type(net).__name__ == "DiffusionModelUNet" and isinstance(net, torch.nn.Module)
    saved = torch.load(bundle / "models" / MAIN_NETWORK[bundle], weights_only=True)["ema"]
    state = net.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    device = parser.get_parsed_content("device")
    assert isinstance(device, torch.device) and device.type in ("cpu", "cuda")


def test_the_anomaly_bundle_ships_its_own_copies_of_the_demo_weights():
    for name in ("model.pt", "autoencoder.pt"):
        assert (ANOMALY / "models" / name).read_bytes() == (LDM / "models" / name).read_bytes(), name
    assert not (LDM / "models" / "diffusion.pt").exists()
    for name in ("calibration.json", "calibration_autoencoder.json"):  # the default calibration is the demo's
        assert (ANOMALY / "models" / name).read_text() == (ANOMALY / "models" / "demo" / name).read_text(), name
    for path in (ANOMALY / "configs").glob("*.yaml"):
        assert "../brain_mri_ldm" not in path.read_text(), path.name  # reads no other bundle's files


@pytest.mark.parametrize("bundle", [LDM, SEG, ANOMALY, IMAGE], ids=lambda b: b.name)
def test_inference_repeats_common_keys_with_the_same_values(bundle):
    import yaml

    common = yaml.safe_load((bundle / "configs" / "common.yaml").read_text())
    inference = yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())
    shared = sorted(set(common) & set(inference))
    assert {"bundle_root", "device", "model_dir", "ckpt_dir", "dataset_dir"} <= set(shared)
    assert {k: inference[k] for k in shared} == {k: common[k] for k in shared}


# ------------------------------------------------------------------------------------------------ runs alone
def run_alone(bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run --config_file configs/inference.yaml ...`` from the bundle folder (model-zoo's
    habit: no common.yaml, no --bundle_root)."""
    argv = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.yaml", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(argv, cwd=bundle, capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=600, env=env)


def test_generation_inference_yaml_runs_alone_and_equals_its_evaluator(tmp_path):
    result = run_alone(LDM, "--steps", "2", "--amp", "none", "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    (nifti,) = sorted((tmp_path / "run").glob("*.nii.gz"))
    side = json.loads(nifti.with_name(nifti.name.replace(".nii.gz", ".json")).read_text())
    assert side["steps"] == 2 and side["models"]["diffusion"]["file"].endswith("models/model.pt")
    # the components, driven by ConfigWorkflow: the same sample
    wf = workflow(LDM, ["inference.yaml"], steps=2, output_dir=str(tmp_path / "components"))
    (path,) = wf.evaluator.run()
    np.testing.assert_allclose(np.asarray(nib.load(path).dataobj), np.asarray(nib.load(nifti).dataobj), atol=1e-5)


def test_generation_components_swap_the_sampler():
    """A component setting changed in the config reaches the inferer MONAI code calls (latents only: no decode)."""
    wf = workflow(LDM, ["inference.yaml"], steps=2, sampler="dpmpp_2m", covariates=None)
    assert wf.inferer.sampler == "dpmpp_2m" and wf.inferer.spacing == "log_snr"
    assert wf.dataset[0] == {"seed": 0, "covariates": None}
    z = wf.inferer(wf.inferer.initial_noise([0]), wf.parser.get_parsed_content("network"), conditioning=None)
    assert tuple(z.shape) == (1, *wf.inferer.meta["latent"]["shape"]) and torch.isfinite(z).all()


def test_generation_run_uses_a_component_swapped_in_the_config(tmp_path):
    """`run` is `evaluator.run()`: an inferer setting changed only on the component (the top-level `sampler` stays
    ddim) is what the bundle command samples with, and the result equals the Python pipeline's."""
    from meddiff3d.pipelines.generation import generate

    result = run_alone(LDM, "--inferer#sampler", "dpmpp_2m", "--steps", "2", "--amp", "none", "--output_dir",
                       str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    side = json.loads((tmp_path / "run" / "sample_seed0.json").read_text())
    assert side["sampler"] == "dpmpp_2m" and side["timestep_spacing"] == "log_snr"
    covariates = yaml_config(LDM, "inference.yaml")["covariates"]
    (path,) = generate(LDM / "models" / "autoencoder.pt", LDM / "models" / "model.pt", covariates=covariates,
                       sampler="dpmpp_2m", steps=2, amp="none", device="cpu", output_dir=tmp_path / "api",
                       progress=False)
    np.testing.assert_allclose(np.asarray(nib.load(path).dataobj),
                               np.asarray(nib.load(tmp_path / "run" / "sample_seed0.nii.gz").dataobj), atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--steps", "0"], "error: steps must be an integer >= 1, got 0"),              # the inferer's check
    (["--num_samples", "-1"], "error: num_samples must be an integer >= 1, got -1"),  # the dataset's
    (["--diffusion_path", "missing.pt"], "error: diffusion model file missing.pt does not exist"),  # network_def's
])
def test_user_errors_of_components_are_one_line(tmp_path, extra, message):
    """A user error raised while MONAI instantiates a component: one `error:` line, exit 2, nothing written."""
    result = run_alone(LDM, *extra, "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("error:")] == [message]
    assert not (tmp_path / "out").exists()


def test_report_user_errors_keeps_tracebacks_of_bugs():
    code = ("from meddiff3d.pipelines.commands import report_user_errors\n"
            "from meddiff3d.errors import InputError\n"
            "import sys\nreport_user_errors(); report_user_errors()\n"
            "raise (RuntimeError('wrapped') if sys.argv[1] == 'user' else ValueError('a bug'))"
            " from (InputError('bad value x') if sys.argv[1] == 'user' else None)")
    user = subprocess.run([sys.executable, "-c", code, "user"], capture_output=True, text=True)
    bug = subprocess.run([sys.executable, "-c", code, "bug"], capture_output=True, text=True)
    assert user.returncode == 2 and user.stderr.strip() == "error: bad value x"
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: a bug" in bug.stderr


def test_generation_evaluator_releases_the_network_before_decoding(tmp_path):
    wf = workflow(LDM, ["inference.yaml"], steps=1, output_dir=str(tmp_path / "out"))
    network = wf.parser.get_parsed_content("network")
    assert wf.evaluator.release_network and not next(network.parameters()).is_meta
    wf.evaluator.run()
    assert all(p.is_meta for p in network.parameters())  # the parser's module holds no weights any more
    with pytest.raises(RuntimeError, match="released its network"):
        wf.evaluator.run()


def yaml_config(bundle: Path, name: str) -> dict:
    import yaml

    return yaml.safe_load((bundle / "configs" / name).read_text())


@pytest.fixture(scope="module")
def brats_cohort(tmp_path_factory):
    from meddiff3d.data.synthetic import write_cohort

    return write_cohort("brats", tmp_path_factory.mktemp("brats"), n=3, seed=1, shape=(32, 48, 32),
                        source="procedural", val_fraction=0.0, test_fraction=0.4, progress=False).datalist


def test_segmentation_inference_yaml_runs_alone_and_equals_its_evaluator(tmp_path, brats_cohort):
    out = tmp_path / "run"
    result = run_alone(SEG, "--datalist", str(brats_cohort), "--num_samples", "1", "--steps", "2", "--amp", "none",
                       "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    case = json.loads(Path(brats_cohort).read_text())["test"][0]["id"]
    wf = workflow(SEG, ["inference.yaml"], datalist=str(brats_cohort), num_samples=1, steps=2,
                  output_dir=str(tmp_path / "components"))
    folders = wf.evaluator.run()
    assert sorted(f.name for f in folders) == sorted(p.name for p in out.iterdir() if p.is_dir())
    sections = json.loads(Path(brats_cohort).read_text())  # no --section: every section with items
    assert len(folders) == sum(len(sections.get(s) or []) for s in ("training", "validation", "test")) > 1
    for kind in ("prob", "seg"):
        a = np.asarray(nib.load(out / case / f"{case}_{kind}.nii.gz").dataobj)
        b = np.asarray(nib.load(tmp_path / "components" / case / f"{case}_{kind}.nii.gz").dataobj)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_segmentation_user_errors_stay_one_line_alone(tmp_path, brats_cohort):
    result = run_alone(SEG, "--datalist", str(brats_cohort), "--sampler", "plms", "--output_dir", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("error: unknown sampler 'plms'")]


@pytest.fixture(scope="module")
def fast_anomaly_bundle(tmp_path_factory):
    """The anomaly bundle's configs and shipped models with a calibration made quick: one starting step, 2 DDIM
    steps, no resampling (its statistics cut to that step), and a T1-like input volume."""
    from meddiff3d.data.synthetic.anatomy import load_anatomy

    root = tmp_path_factory.mktemp("anomaly")
    shutil.copytree(ANOMALY / "configs", root / "configs")
    (root / "models").mkdir()
    for name in ("model.pt", "autoencoder.pt"):
        (root / "models" / name).symlink_to(ANOMALY / "models" / name)
    cal = json.loads((ANOMALY / "models" / "calibration.json").read_text())
    cal["settings"].update(start_steps=cal["settings"]["start_steps"][:1], steps=2, resample=1)
    cal["mask_thresholds"], cal["residual_stats"] = cal["mask_thresholds"][:1], cal["residual_stats"][:1]
    (root / "models" / "calibration.json").write_text(json.dumps(cal))
    anatomy = load_anatomy("mni", (160, 224, 160))
    volume = (anatomy["wm"] + 0.6 * anatomy["gm"]).astype(np.float32)
    affine = np.array([[1.0, 0, 0, -80], [0, 1, 0, -128], [0, 0, 1, -74], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume, affine), root / "t1.nii.gz")
    return root


@pytest.mark.slow
def test_anomaly_inference_yaml_runs_alone_and_equals_its_evaluator(tmp_path, fast_anomaly_bundle):
    root = fast_anomaly_bundle
    result = run_alone(root, "--inputs", f"['{root / 't1.nii.gz'}']", "--amp", "none", "--output_dir",
                       str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    wf = workflow(root, ["inference.yaml"], inputs=[str(root / "t1.nii.gz")], output_dir=str(tmp_path / "comp"))
    (case,) = wf.evaluator.run()
    assert case["volume_score"] == pytest.approx(summary["cases"][0]["volume_score"], abs=1e-4)
    for suffix in ("_anomaly_map.nii.gz", "_mask.nii.gz"):
        img = nib.load(tmp_path / "comp" / f"t1{suffix}")
        assert img.shape == (160, 224, 160)


# ------------------------------------------------------------------------------------------------ exports
def test_decoder_exports_to_torchscript_and_decodes_as_the_codec(tmp_path):
    from meddiff3d.models.loading import load_model
    from meddiff3d.pipelines.components import export_decoder

    export_decoder(LDM / "models" / "autoencoder.pt", tmp_path / "decoder.ts", latent_shape=[3, 4, 6, 4])
    decoder = torch.jit.load(str(tmp_path / "decoder.ts"))
    codec = load_model(LDM / "models" / "autoencoder.pt", "codec").network
    z = torch.randn(1, 3, 4, 6, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoder(z), codec.decode(z), atol=1e-4, rtol=1e-4)


def test_segmentation_denoiser_exports_with_its_timestep_input(tmp_path):
    from meddiff3d.models.loading import load_model
    from meddiff3d.pipelines.components import export_segmentation_denoiser

    export_segmentation_denoiser(SEG / "models" / "model.pt", tmp_path / "denoiser.ts", patch_size=[16, 16, 16])
    ts = torch.jit.load(str(tmp_path / "denoiser.ts"))
    net = load_model(SEG / "models" / "model.pt", "segmentation_diffusion").network
    x = torch.randn(2, net.in_channels, 16, 24, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 700])
    with torch.no_grad():
        torch.testing.assert_close(ts(x, t), net(x, timesteps=t), atol=1e-4, rtol=1e-4)


def test_inputs_default_to_every_section_with_items_and_say_which(brats_cohort, caplog):
    import logging

    from meddiff3d.pipelines.components import resolve_inputs

    doc = json.loads(Path(brats_cohort).read_text())
    counts = {s: len(doc.get(s) or []) for s in ("training", "validation", "test") if doc.get(s)}
    with caplog.at_level(logging.INFO, logger="meddiff3d.pipelines"):
        items = resolve_inputs(brats_cohort, None, modalities=4)
    assert len(items) == sum(counts.values()) and len({it["id"] for it in items}) == len(items)
    for name, n in counts.items():
        assert f"{name} {n} case(s)" in caplog.text
    assert [it["id"] for it in resolve_inputs(brats_cohort, "test", modalities=4)] == [it["id"] for it in doc["test"]]
