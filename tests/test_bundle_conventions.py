"""The four bundles as MONAI's tooling sees them: model-zoo's verify_bundle checks (min, and full with the exemptions
model-zoo grants generative bundles), training configs as MONAI training workflows, self-contained folders whose
shared fragments equal their source in configs/, and demo presets that reproduce the shipped weights' recipe.

The model-zoo checks follow Project-MONAI/model-zoo ci/verify_bundle.py (read, not copied): ``min`` = the necessary
files (configs/metadata.json, LICENSE), the preferred files (models/model.pt, configs/inference.*), large files
(large_files.yml) resolvable, version and changelog, the metadata schema; ``full`` adds the inference workflow's
properties, ``verify_net_in_out`` and ``ckpt_export``, which model-zoo skips for its generative bundles
(``exclude_verify_shape_list``, ``exclude_verify_torchscript_list`` in ci/bundle_custom_data.py) and so do we, with the
reason stated in each README. What cannot apply here: model-zoo's "version not yet in models/model_info.json" (no
registry) -- the newest changelog entry must be the version instead.

The demo-preset tests run each bundle's "Retrain the demo weights" commands for 1-2 steps on a small synthetic cohort
(64x96x64 at 2.5 mm for the brain pair, whose 64^3 autoencoder patches must fit; 48x64x48 at 3.5 mm for the 48^3
segmentation patches) and compare the written meta with the shipped files' on CODEC_KEYS, LDM_KEYS and SEGDIFF_KEYS:
network spec, schedule, prediction, conditioning (mode, covariates, null value, coordinate channels), Min-SNR gamma,
conditioning dropout, losses, patch size (and foreground share), batch size, learning rate, EMA decay (codec), seed.
What only size changes is not compared: the image grid and the latent spatial shape, the iterations, the cohort's
datalist and volume count. The declared ``train#inferer`` must equal the objective the run recorded.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_testing import ROOT, SCHEMA, Bundle, script_module

BUNDLES = ("brain_mri_ldm", "brats_mri_segdiff", "brain_mri_anomaly_ldm", "medical_2d_ddpm")
TRAIN_CONFIGS = [("brain_mri_ldm", "train_autoencoder.yaml"), ("brain_mri_ldm", "train_diffusion.yaml"),
                 ("brats_mri_segdiff", "train.yaml"), ("brain_mri_anomaly_ldm", "train_autoencoder.yaml"),
                 ("brain_mri_anomaly_ldm", "train_diffusion.yaml"), ("medical_2d_ddpm", "train.yaml")]
#: packages a bundle may not list in required_packages_version: not on PyPI (each README says how to install it)
UNPUBLISHED = ("meddiff3d",)
#: the model-zoo checks this project's bundles are exempt from, as model-zoo exempts its own generative bundles
EXEMPT = ("verify_net_in_out", "ckpt_export")


def config_names(cmd: str) -> list[str]:
    files = re.search(r"--config_file \"\[(.*?)\]\"", cmd).group(1)
    return re.findall(r"'([^']+)'", files)


def all_readme_commands(bundle: Bundle) -> list[str]:
    text = (bundle.path / "docs" / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines() if "monai.bundle run" in line]


def metadata(name: str) -> dict:
    return json.loads((ROOT / "bundles" / name / "configs" / "metadata.json").read_text())


# ------------------------------------------------------------------------------------------------ model-zoo, min
@pytest.mark.parametrize("name", BUNDLES)
def test_verify_bundle_min_files(name):
    path = ROOT / "bundles" / name
    for necessary in ("configs/metadata.json", "LICENSE"):
        assert (path / necessary).is_file(), necessary
    assert any((path / "configs" / f"inference.{ext}").is_file() for ext in ("json", "yaml", "yml"))
    large = [path / f"large_files.{ext}" for ext in ("yml", "yaml", "json") if (path / f"large_files.{ext}").exists()]
    model = path / "models" / "model.pt"
    if large:  # weights outside git: each entry names a path and a url
        from monai.bundle import ConfigParser

        entries = ConfigParser.load_config_file(str(large[0]))["large_files"]
        assert all({"path", "url"} <= set(e) for e in entries)
        assert "models/model.pt" in [e["path"] for e in entries]
    else:  # weights in the folder (in git): a real torch file, not a Git LFS pointer
        assert model.is_file() and model.stat().st_size > 10_000, model
        assert model.read_bytes()[:2] == b"PK", f"{model} is not a torch zip file"
        assert "meta" in torch.load(model, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_bundle_min_version_and_changelog(name):
    meta = metadata(name)
    version = meta["version"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version) and version in meta["changelog"]
    newest = max(meta["changelog"], key=lambda v: tuple(int(p) for p in v.split(".")))
    assert newest == version, f"the newest changelog entry {newest} is not the version {version}"


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_bundle_min_metadata_schema_offline(name):
    """``python -m monai.bundle verify_metadata`` against the schema in ../shared/monai (no download)."""
    if not SCHEMA.is_file():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (CI keeps ../shared beside the clone)")
    meta_file = ROOT / "bundles" / name / "configs" / "metadata.json"
    result = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(meta_file),
                             "--filepath", str(SCHEMA)], check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "metadata is verified with no error" in result.stdout + result.stderr


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_keys_model_zoo_expects(name):
    meta = metadata(name)
    schema = json.loads(SCHEMA.read_text()) if SCHEMA.is_file() else {"required": []}
    for key in (*schema["required"], "name", "changelog", "eval_metrics", "data_source", "intended_use"):
        assert meta.get(key) not in (None, "", {}, []), key
    assert all(isinstance(v, (int, float)) for v in meta["eval_metrics"].values()), meta["eval_metrics"]
    for package in UNPUBLISHED:
        assert package not in meta["required_packages_version"], package
    readme = (ROOT / "bundles" / name / "docs" / "README.md").read_text()
    assert "required_packages_version" in readme and "not published" in readme  # the documented reason


def test_eval_metrics_are_the_recorded_figures():
    """eval_metrics quote the records the model cards cite, not retyped numbers."""
    metrics = metadata("brain_mri_anomaly_ldm")["eval_metrics"]
    for pair, record in (("", "demo"), ("vq_", "vq")):  # the KL demo pair's and the VQ-VAE pair's evaluation
        path = ROOT / "bundles/brain_mri_anomaly_ldm/models" / record / "evaluation" / "metrics.json"
        anomaly = json.loads(path.read_text())
        run = json.loads((path.parents[1] / "demo_run.json").read_text())["out_of_template"]["summary"]
        for method in ("diffusion", "autoencoder"):
            for key in ("dice", "best_dice", "auprc", "auroc", "volume_auroc"):
                expected = round(anomaly["methods"][method]["all"][key], 3)
                assert metrics[f"{pair}{method}_{key}"] == expected, (pair, method, key)
            key = f"{pair}{method}_flagged_healthy_fraction_out_of_template"
            assert metrics[key] == round(run[method]["flagged_normal_fraction"], 3), key
    record = json.loads((ROOT / "bundles/brain_mri_ldm/models/demo_training.json").read_text())["autoencoder"]
    metrics = metadata("brain_mri_ldm")["eval_metrics"]
    assert metrics["autoencoder_psnr_db"] == round(record["psnr"], 2)
    assert metrics["autoencoder_ssim"] == round(record["ssim"], 3)
    assert metrics["autoencoder_psnr_brain_db"] == round(record["psnr_brain"], 2)
    assert metrics["autoencoder_ssim_brain"] == round(record["ssim_brain"], 3)
    for covariate, short in (("ventricular_volume", "ventricles"), ("brain_volume", "brain")):  # unguided sweeps
        sweep = ROOT / "bundles/brain_mri_ldm/models/evaluation/sweeps" / f"sweep_{covariate}.json"
        statistics = json.loads(sweep.read_text())["statistics"]
        assert metrics[f"sweep_{short}_slope"] == round(statistics["slope"], 3)
        assert metrics[f"sweep_{short}_r"] == round(statistics["r"], 3)


def test_image_bundle_eval_metrics_are_its_recorded_figures():
    """medical_2d_ddpm's eval_metrics quote its evaluation records (the model card's tables), made with the shipped
    weights and their own sampling, not retyped numbers."""
    import hashlib

    metrics = metadata("medical_2d_ddpm")["eval_metrics"]
    models = ROOT / "bundles/medical_2d_ddpm/models"
    record = json.loads((models / "evaluation" / "inverse_problems.json").read_text())
    quoted = {k: re.fullmatch(r"(kspace_\dx|sr_\dx)_(\w+?)_(psnr_db|ssim)", k) for k in metrics}
    quoted = {k: m for k, m in quoted.items() if m}
    assert len(quoted) == 20
    for key, match in quoted.items():
        setting, method, metric = match.groups()
        value = record["table"][setting]["methods"][method][metric.removesuffix("_db")]
        assert metrics[key] == round(value, 2 if metric == "psnr_db" else 3), key
    generation = json.loads((models / "evaluation" / "generation.json").read_text())
    assert metrics["class_fidelity_generated"] == generation["class_fidelity"]["generated_accuracy_mean"]
    assert metrics["ms_ssim_within_class_generated"] == generation["diversity_ms_ssim_within_class"]["generated"]
    assert metrics["seconds_per_image"] == generation["time"]["seconds_per_image"]
    assert generation["model"]["sha256"] == hashlib.sha256((models / "model.pt").read_bytes()).hexdigest()
    own = torch.load(models / "model.pt", map_location="cpu", weights_only=True)["meta"]["sampling"]
    assert (own["sampler"], own["steps"]) == (generation["sampler"], generation["steps"]) == \
        (record["sampler"], record["steps"])


# ------------------------------------------------------------------------------------------------ model-zoo, full
@pytest.mark.parametrize("name", BUNDLES)
def test_verify_bundle_full_inference_properties(name):
    """What model-zoo's full mode checks of the inference config, run alone: MONAI's inference properties."""
    from monai.bundle import ConfigWorkflow

    path = ROOT / "bundles" / name
    workflow = ConfigWorkflow(config_file=str(path / "configs" / "inference.yaml"), workflow_type="infer",
                              meta_file=str(path / "configs" / "metadata.json"),
                              logging_file=str(path / "configs" / "logging.conf"), bundle_root=str(path))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.network_def, torch.nn.Module)


@pytest.mark.parametrize("name", BUNDLES)
def test_verify_bundle_full_exemptions_are_stated(name):
    readme = (ROOT / "bundles" / name / "docs" / "README.md").read_text()
    for check in EXEMPT:
        assert check in readme, f"{name} README does not state the {check} exemption"
    assert "exclude_verify_shape_list" in readme and "exclude_verify_torchscript_list" in readme


# ------------------------------------------------------------------------------------------------ training workflows
@pytest.mark.parametrize("name, task", TRAIN_CONFIGS)
@pytest.mark.parametrize("overlay", [(), ("multi_gpu.yaml",)], ids=["", "multi_gpu"])
def test_training_configs_are_monai_training_workflows(name, task, overlay, monkeypatch):
    from monai.bundle import ConfigWorkflow

    monkeypatch.setenv("LOCAL_RANK", "0")
    path = ROOT / "bundles" / name / "configs"
    workflow = ConfigWorkflow(config_file=[str(path / f) for f in ("common.yaml", task, *overlay)],
                              workflow_type="train", meta_file=str(path / "metadata.json"), logging_file=False,
                              bundle_root=str(path.parent))
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.device, torch.device)  # also under multi_gpu.yaml (cuda:LOCAL_RANK)
    if overlay:
        assert workflow.device == torch.device("cuda", 0)
    run = workflow.parser["run"]
    assert run["_target_"].startswith("meddiff3d.pipelines.commands.train_")  # `run` is the one recipe call
    # the trainer's budget (max_epochs or max_iterations) is the recipe's
    assert run["max_iterations"].replace("::", "#") == "$@train#trainer.max_iterations"
    budget = workflow.parser[workflow.parser["train#trainer#max_iterations"][1:]]
    assert workflow.max_epochs is None and workflow.trainer.max_iterations == budget
    assert workflow.parser["train#dataset#transform"].replace("::", "#") == "@train#preprocessing"
    assert workflow.train_inferer is not None and len(workflow.train_dataset.section) > 0
    assert workflow.parser["network_def"]["_target_"].startswith("meddiff3d.pipelines.training_components.")
    from monai.bundle import ConfigParser

    own = ConfigParser.load_config_file(str(path / task))  # few `$` in the training config itself
    expressions = [v for v in _strings(own) if v.startswith("$")]
    assert len(expressions) <= 2, expressions


def _strings(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)
    elif isinstance(node, str):
        yield node


def test_recipe_trainer_counts_epochs_in_whole_batches(monkeypatch):
    from meddiff3d.pipelines.training_components import RecipeTrainer

    assert RecipeTrainer(max_iterations=7, batch_size=2).max_iterations == 7
    assert RecipeTrainer(max_iterations=7, batch_size=2, max_epochs=3, dataset=list(range(5))).max_iterations == 6
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert RecipeTrainer(max_iterations=7, batch_size=2, max_epochs=3, dataset=list(range(9))).max_iterations == 6


# ------------------------------------------------------------------------------------------------ self-contained
def test_bundle_copies_of_shared_fragments_equal_their_source():
    """Every copy under bundles/*/configs/{presets,data}/ is its configs/ source behind the copy header."""
    sync = script_module("sync_bundle_configs")
    copies = sync.bundle_copies()
    assert {f"{c.parts[-4]}/{c.parts[-2]}/{c.name}" for c in copies} >= {
        "brain_mri_ldm/data/synthetic_healthy.yaml", "brain_mri_ldm/presets/tiny_cpu.yaml",
        "brain_mri_ldm/presets/demo.yaml", "brats_mri_segdiff/data/synthetic_brats.yaml",
        "brats_mri_segdiff/presets/tiny_cpu.yaml", "brain_mri_anomaly_ldm/data/synthetic_anomaly.yaml",
        "brain_mri_anomaly_ldm/data/synthetic_healthy.yaml", "brain_mri_anomaly_ldm/presets/tiny_cpu.yaml",
        "brain_mri_anomaly_ldm/presets/demo.yaml", "medical_2d_ddpm/data/synthetic_slices.yaml",
        "medical_2d_ddpm/presets/tiny_cpu.yaml", "medical_2d_ddpm/presets/demo.yaml"}
    for copy in copies:
        expected = sync.expected_copy(copy)
        assert copy.read_text() == expected, (f"{copy.relative_to(ROOT)} differs from its source; edit the source in "
                                              "configs/ and run `python scripts/sync_bundle_configs.py`")
    sources = {sync.source_of(c) for c in copies}
    assert sources == set((ROOT / "configs").rglob("*.yaml")), "a fragment of configs/ that no bundle copies"


@pytest.mark.parametrize("name", BUNDLES)
def test_readme_commands_name_only_files_inside_the_bundle(name):
    bundle = Bundle(name)
    text = (bundle.path / "docs" / "README.md").read_text()
    assert "../" not in text, "the README reaches outside the bundle folder"
    commands = all_readme_commands(bundle)
    assert commands
    for cmd in commands:
        for file in config_names(cmd):
            assert not file.startswith(("/", "..")) and (bundle.path / file).is_file(), f"{file} in: {cmd}"
    for config in (bundle.path / "configs").rglob("*.yaml"):
        assert "../" not in config.read_text(), f"{config.relative_to(ROOT)} reaches outside the bundle folder"


@pytest.mark.parametrize("name", BUNDLES)
def test_no_other_config_overwrites_an_inference_component(name):
    """Presets, data fragments and overlays are merged with inference.yaml by README commands: none of their top-level
    keys may replace one of its components (a preset's `network: tiny_cpu` would replace the network). Task configs
    (training, medical_2d_ddpm's reconstruct.yaml: each with a `run` of its own), never merged with it, declare their
    own components."""
    import yaml

    configs = ROOT / "bundles" / name / "configs"
    inference = yaml.safe_load((configs / "inference.yaml").read_text())
    components = {k for k, v in inference.items() if isinstance(v, dict) and "_target_" in v}
    components |= {"network_def", "network", "inferer", "evaluator", "dataset", "preprocessing", "postprocessing"}
    for path in configs.rglob("*.yaml"):
        if path.name in ("inference.yaml", "common.yaml") or path.name.startswith("train"):
            continue
        keys = set(yaml.safe_load(path.read_text()) or {})
        if "run" in keys and path.parent == configs:
            continue  # a task config
        clash = keys & components - {"device", "initialize", "datalist"}
        assert not clash, f"{path.relative_to(ROOT)} sets the inference component(s) {sorted(clash)}"


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_folder_copied_alone_parses_every_readme_command(name, tmp_path):
    """A copy of the folder elsewhere (no repository around it) parses each README command's configs."""
    from monai.bundle import ConfigParser

    copy = tmp_path / name
    shutil.copytree(ROOT / "bundles" / name, copy)
    for cmd in all_readme_commands(Bundle(name)):
        parser = ConfigParser()
        parser.read_config([str(copy / f) for f in config_names(cmd)])
        parser["bundle_root"] = str(copy)
        run = parser["run"]  # the config's evaluator, or one recipe call
        assert run == "$@evaluator.run()" or run["_target_"].startswith("meddiff3d.pipelines.commands."), cmd
        if "model_dir" in parser:  # the weights belong to the bundle (MONAI's convention)
            assert Path(parser.get_parsed_content("model_dir")).resolve().is_relative_to(copy.resolve()), cmd
        for key in ("run_dir", "data_dir", "evaluation_dir", "output_dir"):  # what a run writes: the current folder
            if key in parser:
                value = parser.get_parsed_content(key)
                assert not Path(value).is_absolute() and Path(value).parts[0] == "outputs", (key, value, cmd)


@pytest.mark.parametrize("name", BUNDLES)
def test_data_license(name):
    text = " ".join((ROOT / "bundles" / name / "docs" / "data_license.txt").read_text().split())
    if name == "brats_mri_segdiff":  # procedural demo data; real BraTS data keep their terms
        assert "procedural" in text and "BraTS" in text and "Menze" in text and "Bakas" in text
    else:  # demo data derive from the ICBM 2009a / MNI152 template shipped by nilearn
        assert "ICBM 2009a" in text and "nilearn" in text and "Louis Collins" in text
        assert "provided that the above copyright notice appear in all copies" in text
    assert "data_license.txt" in (ROOT / "bundles" / name / "docs" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ demo recipes
def shipped_meta(bundle: Path, name: str) -> dict:
    """The meta of ``bundle/models/name``."""
    return torch.load(bundle / "models" / name, map_location="cpu", weights_only=True)["meta"]


#: compared between the shipped weights' meta and a 1-2 iteration run of the demo preset: the network spec and the
#: objective settings (what may differ only with size, the image grid of the tiny cohort and the iterations, is not)
CODEC_KEYS = ("network", "kind", "training#losses", "training#discriminator", "training#patch_size",
              "training#batch_size", "training#lr", "training#ema_decay", "training#seed")
LDM_KEYS = ("network", "schedule", "prediction", "conditioning#mode", "conditioning#covariates",
            "conditioning#null_value", "conditioning#coordinates", "training#cond_dropout", "training#min_snr_gamma",
            "training#batch_size", "training#lr", "training#seed", "latent#shape#0")
SEGDIFF_KEYS = ("network", "schedule", "prediction", "regions", "modalities", "inputs", "patch",
                "training#batch_size", "training#lr", "training#seed")
IMAGE_KEYS = ("network", "schedule", "prediction", "classes", "image#shape", "image#intensity", "sampling",
              "training#cond_dropout", "training#min_snr_gamma", "training#batch_size", "training#lr", "training#seed")


def pick(meta: dict, key: str):
    for part in key.split("#"):
        meta = meta[int(part)] if isinstance(meta, list) else meta[part]
    return meta


def assert_same(trained: dict, shipped: dict, keys) -> None:
    for key in keys:
        assert pick(trained, key) == pick(shipped, key), key


def demo_commands(name: str, section: str = "Retrain the demo weights") -> list[str]:
    return Bundle(name).readme_commands(section)


def declared(bundle: Bundle, cmd: str, root: Path, *overrides: str):
    """``(train#inferer, network_def)`` of a README command's configs parsed in the copy ``root`` with the test's
    ``--key value`` overrides: what the config declares, to compare with what its ``run`` trained."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(root / f) for f in config_names(cmd)])
    parser["bundle_root"] = str(root)
    parser.update({key.lstrip("-"): _literal(value) for key, value in zip(overrides[::2], overrides[1::2])})
    return parser.get_parsed_content("train#inferer"), parser.get_parsed_content("network_def")


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def assert_network_is_the_trained_one(network: torch.nn.Module, weights: dict, prefix: str = "") -> None:
    shapes = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    assert shapes == {k[len(prefix):]: tuple(v.shape) for k, v in weights.items() if k.startswith(prefix)}


def assert_objective_is_the_trained_one(objective, meta: dict) -> None:
    objective = getattr(objective, "diffusion", objective)  # SegmentationObjective wraps a DiffusionObjective
    assert objective.prediction == meta["prediction"]
    from meddiff3d.diffusion import schedule_from_dict

    assert objective.schedule.to_dict() == schedule_from_dict(meta["schedule"]).to_dict()
    assert objective.min_snr_gamma == meta["training"].get("min_snr_gamma")
    if "conditioning" in meta:
        assert objective.cond_dropout == meta["training"]["cond_dropout"]
        assert (objective.network_wrapper is not None) == meta["conditioning"]["coordinates"]


# a small cohort on which the demo recipes' patches fit (64^3 for the autoencoder, 48^3 for the segmentation model)
BRAIN_SMALL = ("--image_shape", "[64,96,64]", "--spacing", "[2.5,2.5,2.5]", "--synthetic_n", "6")
BRATS_SMALL = ("--image_shape", "[48,64,48]", "--spacing", "[3.5,3.5,3.5]", "--synthetic_n", "6")
# 6 small subjects (4 mm voxels), 4 slices each (20 training slices: one batch of 16), at the demo's 64x64 (the
# image size is in IMAGE_KEYS)
SLICES_SMALL = ("--synthetic_n", "6", "--synthetic_volume_shape", "[40,56,40]", "--slices_per_volume", "4")


#: (bundle, README section of the retraining commands, folder of the pair under models/)
LDM_DEMOS = [("brain_mri_ldm", "Retrain the demo weights", ""),
             ("brain_mri_anomaly_ldm", "Retrain the demo weights", ""),
             ("brain_mri_anomaly_ldm", "Retrain the VQ-VAE pair", "vq/")]


@pytest.mark.slow
@pytest.mark.parametrize("name, section, pair", LDM_DEMOS)
def test_demo_preset_reproduces_the_shipped_latent_diffusion_recipe(name, section, pair, tmp_path_factory):
    bundle, root = Bundle(name), tmp_path_factory.mktemp(name)
    train_ae, train_ldm = demo_commands(name, section)
    data = ("--data_dir", str(tmp_path_factory.getbasetemp() / "demo_healthy_cohort"))
    result = bundle.run(train_ae, root, *BRAIN_SMALL, *data, "--autoencoder_max_iterations", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    result = bundle.run(train_ldm, root, *BRAIN_SMALL, *data, "--diffusion_max_iterations", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(shipped_meta(root, pair + "autoencoder.pt"), shipped_meta(bundle.path, pair + "autoencoder.pt"),
                CODEC_KEYS)
    trained = shipped_meta(root, pair + "model.pt")
    # brain_mri_ldm's model also records its default sampling (the demo preset's, from the quality table); the
    # anomaly bundle ships the same weights without it (its calibration is tied to that file's hash)
    keys = LDM_KEYS + (("sampling",) if name == "brain_mri_ldm" else ())
    assert_same(trained, shipped_meta(bundle.path, pair + "model.pt"), keys)
    objective, network = declared(bundle, train_ldm, root, *BRAIN_SMALL, *data)
    assert_objective_is_the_trained_one(objective, trained)
    weights = torch.load(root / "models" / pair / "model.pt", map_location="cpu", weights_only=True)["ema"]
    assert_network_is_the_trained_one(network, weights)
    _, autoencoder = declared(bundle, train_ae, root, *BRAIN_SMALL, *data)
    codec = torch.load(root / "models" / pair / "autoencoder.pt", map_location="cpu", weights_only=True)["weights"]
    assert_network_is_the_trained_one(autoencoder, codec, prefix="autoencoder.")


@pytest.mark.slow
def test_demo_preset_reproduces_the_shipped_segmentation_recipe(tmp_path):
    bundle = Bundle("brats_mri_segdiff")
    (train,) = demo_commands("brats_mri_segdiff")
    result = bundle.run(train, tmp_path, *BRATS_SMALL, "--max_iterations", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = shipped_meta(tmp_path, "model.pt")
    assert_same(trained, shipped_meta(bundle.path, "model.pt"), SEGDIFF_KEYS)
    objective, network = declared(bundle, train, tmp_path, *BRATS_SMALL)
    assert_objective_is_the_trained_one(objective, trained)
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["ema"]
    assert_network_is_the_trained_one(network, weights)


@pytest.mark.slow
def test_demo_preset_reproduces_the_shipped_image_diffusion_recipe(tmp_path):
    bundle = Bundle("medical_2d_ddpm")
    (train,) = demo_commands("medical_2d_ddpm")
    result = bundle.run(train, tmp_path, *SLICES_SMALL, "--max_iterations", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = shipped_meta(tmp_path, "model.pt")
    assert_same(trained, shipped_meta(bundle.path, "model.pt"), IMAGE_KEYS)
    objective, network = declared(bundle, train, tmp_path, *SLICES_SMALL)
    assert_objective_is_the_trained_one(objective, trained)
    assert objective.cond_dropout == trained["training"]["cond_dropout"] and objective.keyword_keys == ("class_labels",)
    weights = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)["ema"]
    assert_network_is_the_trained_one(network, weights)
