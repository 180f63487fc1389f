"""Every command of the four bundle READMEs (``bundles/*/docs/README.md``), run by bash exactly as printed.

Coverage: each command of each ```bash block (``tests/doc_commands.py``) is either run by a test of this module -- its
text is listed in ``RUNS`` under that test's name, and the test runs exactly the listed texts -- or named in
``EXEMPT`` with the measured reason it cannot run here. ``test_every_readme_command_is_run_or_exempt`` fails on a
README command in neither and on a listed command no README prints any more.

How a command runs (``bundle_testing.run_as_printed``): ``bash -c <the command>`` in a copy of the bundle folder
(``Bundle.copy_to``, with the shipped weights for the commands that use them), ``python`` being this interpreter,
nothing appended. The READMEs' placeholders are shell variables, stated once in each README's prose: ``DATA`` = the
folder of the user's datasets, here the ``data`` fixture (the smallest real inputs, meddiff3d's synthetic cohorts:
4 healthy T1 volumes of 160x224x160 at 1 mm in ``t1/``, training 2 / validation 1 / test 1, two of them also as
``a.nii.gz`` and ``b.nii.gz``; one BraTS-like case with its label in ``brats/``; one T1 with a tumour and its mask in
``anomaly/``), ``ZOO`` = the folder of downloaded model-zoo bundles, here files of the model-zoo format written by
the test.

Training on a user datalist (the full recipe: hours, meant for a GPU) is started as printed and stopped after its
first step: once its progress bar shows a completed iteration, SIGINT goes to its process group (Ctrl-C;
``bundle_testing.run_until_first_step``) and the test checks the run folder it left in ``outputs/runs/<bundle>/``.
The tiny-preset commands and the demo-weight commands run to completion, in the README's order within a section.
All execution tests are slow: together ~14 min on this 2-core machine shared with other jobs (each test's docstring
gives its time; EXEMPT the measured reasons).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bundle_testing import (ROOT, Bundle, check_generated, check_segmented, run_as_printed,
                            run_until_first_step)
from doc_commands import commands as printed_commands

LDM, SEG, ANOMALY, IMAGE = "brain_mri_ldm", "brats_mri_segdiff", "brain_mri_anomaly_ldm", "medical_2d_ddpm"
BUNDLES = (LDM, SEG, ANOMALY, IMAGE)
#: the READMEs' placeholders (shell variables, each stated in the README's prose)
PLACEHOLDERS = ("DATA", "ZOO")


def bundle_run(*configs: str, args: str = "") -> str:
    """The README text ``python -m monai.bundle run`` over ``configs/common.yaml`` and ``configs`` (under configs/)."""
    files = ",".join(f"'configs/{name}'" for name in ("common.yaml", *configs))
    return f'python -m monai.bundle run --config_file "[{files}]"' + (f" {args}" if args else "")


T1, BRATS = "--datalist $DATA/t1/datalist.json", "--datalist $DATA/brats/datalist.json"
LDM_TINY = ("data/synthetic_healthy.yaml", "presets/tiny_cpu.yaml")
SEG_TINY = ("data/synthetic_brats.yaml", "presets/tiny_cpu.yaml")
ANOMALY_TINY = ("data/synthetic_anomaly.yaml", "presets/tiny_cpu.yaml", "tiny_cpu.yaml")
ZOO_FILES = "$ZOO/brain_image_synthesis_latent_diffusion_model/models"
SLICE, SLICES = "--inputs \"['$DATA/slices/slice.png']\"", "$DATA/slices/datalist.json"
IMAGE_TINY = ("data/synthetic_slices.yaml", "presets/tiny_cpu.yaml")


def torchrun(command: str) -> str:
    """The README's multi-GPU form of ``command`` (a ``python -m ...`` line): one process on each of 4 GPUs."""
    return command.replace("python -m ", "python -m torch.distributed.run --nproc_per_node 4 -m ", 1)


#: test name -> (bundle, the README commands it runs as printed, in this order)
RUNS: dict[str, tuple[str, list[str]]] = {
    "test_ldm_generate_on_the_demo_weights": (LDM, [
        bundle_run("inference.yaml"),
        bundle_run("inference.yaml", args="--steps 20 --sampler dpmpp_2m"),
        bundle_run("inference.yaml", args="--covariates#age 0.9 --guidance_scale 3 --num_samples 4"),
        bundle_run("inference.yaml", args="--covariates null --seed 7"),
        bundle_run("inference.yaml", args="--diffusion_path models/model_distilled.pt --output_dir outputs/student"),
    ]),
    "test_ldm_diffusion_training_starts_on_a_datalist": (LDM, [bundle_run("train_diffusion.yaml", args=T1)]),
    "test_ldm_tiny_preset_in_order": (LDM, [
        bundle_run("train_autoencoder.yaml", *LDM_TINY),
        bundle_run("train_diffusion.yaml", *LDM_TINY),
        bundle_run("inference.yaml", "presets/tiny_cpu.yaml", args="--num_samples 2"),
    ]),
    "test_ldm_convert_model_zoo": (LDM, [
        f"python -m meddiff3d convert-model-zoo {ZOO_FILES}/autoencoder.pt {ZOO_FILES}/model.pt models/model_zoo",
    ]),
    "test_segdiff_on_the_demo_weights": (SEG, [
        bundle_run("inference.yaml", args=BRATS),
        bundle_run("inference.yaml", args=f"{BRATS} --num_samples 1 --sampler dpmpp_2m --steps 10"),
        bundle_run("inference.yaml", args=f"{BRATS} --roi_size [48,48,48] --num_samples 1"),
        bundle_run("evaluate.yaml", args=BRATS),
    ]),
    "test_segdiff_tiny_preset_in_order": (SEG, [
        bundle_run("train.yaml", *SEG_TINY),
        bundle_run("inference.yaml", *SEG_TINY),
        bundle_run("evaluate.yaml", *SEG_TINY),
    ]),
    "test_segdiff_demo_retraining_starts": (SEG, [
        bundle_run("train.yaml", "data/synthetic_brats.yaml", "presets/demo.yaml"),
    ]),
    "test_anomaly_on_the_demo_weights": (ANOMALY, [
        bundle_run("calibrate.yaml", args=T1),
        bundle_run("calibrate.yaml", args=f'{T1} --detector#noise simplex --detector#start_steps "[250]"'),
        bundle_run("inference.yaml", args=f"{T1} --section test"),
        bundle_run("inference.yaml", args="""--inputs "['$DATA/a.nii.gz','$DATA/b.nii.gz']" --output_dir out"""),
        bundle_run("inference.yaml", "demo_models.yaml", args="""--inputs "['$DATA/a.nii.gz']\""""),
        bundle_run("inference.yaml", "vq_models.yaml", args="""--inputs "['$DATA/a.nii.gz']" --output_dir out_vq"""),
        bundle_run("evaluate.yaml", args="--datalist $DATA/anomaly/datalist.json"),
    ]),
    "test_anomaly_training_starts_on_a_datalist": (ANOMALY, [
        bundle_run("train_autoencoder.yaml", args=T1),
        bundle_run("train_diffusion.yaml", args=T1),
    ]),
    "test_anomaly_tiny_preset_in_order": (ANOMALY, [
        bundle_run(f"{task}.yaml", *ANOMALY_TINY)
        for task in ("train_autoencoder", "train_diffusion", "calibrate", "inference", "evaluate")
    ]),
    "test_image_generate_and_reconstruct_on_the_demo_weights": (IMAGE, [
        bundle_run("inference.yaml"),
        bundle_run("inference.yaml", args="--class_name superior --guidance_scale 2 --num_samples 4"),
        bundle_run("reconstruct.yaml", args=SLICE),
        bundle_run("reconstruct.yaml", args=f"{SLICE} --acceleration 8 --center_fraction 0.04 --mask_kind equispaced"),
        bundle_run("reconstruct.yaml", args="""--inputs "['$DATA/slices/kspace.npy']" --mask $DATA/slices/mask.npy"""),
        bundle_run("reconstruct.yaml", args=f"--task super_resolution {SLICE} --factor 4"),
        bundle_run("reconstruct.yaml", args=f"--task super_resolution --inputs {SLICES} --factor 2"),
    ]),
    "test_image_training_starts_on_a_datalist": (IMAGE, [bundle_run("train.yaml", args=f"--datalist {SLICES}")]),
    "test_image_tiny_preset_in_order": (IMAGE, [
        bundle_run("train.yaml", *IMAGE_TINY),
        bundle_run("inference.yaml", "presets/tiny_cpu.yaml", args="--num_samples 4"),
        bundle_run("reconstruct.yaml", *IMAGE_TINY),
    ]),
}

_GPUS = ("needs 4 CUDA GPUs (torchrun, one process per GPU); multi_gpu.yaml taking its device from LOCAL_RANK is "
         "tested in the bundle's tests/test_bundle_<name>.py (test_multi_gpu_overlay_*, test_overlays_multi_gpu_*)")
_BRAIN_DEMO = ("the demo recipe first writes its cohort, 256 full-size MNI152-based subjects with domain-randomised "
               "acquisition: 4-5 s a subject here, ~20 min before the first step; the same config chain runs for one "
               "step on a small cohort in tests/test_bundle_conventions.py::test_demo_preset_reproduces_the_shipped_"
               "latent_diffusion_recipe")
#: in-brain correlation the distilled demo student's sample must keep with its teacher's from the same noise and
#: condition (measured 0.998; two teacher samples of one condition from different noise: 0.72)
STUDENT_TEACHER_R = 0.95
#: bundle -> {README command: why no test runs it here (measured on this 2-core machine, 24 GB)}
EXEMPT: dict[str, dict[str, str]] = {
    LDM: {
        bundle_run("train_autoencoder.yaml", args=T1): (
            "the anchor autoencoder recipe (AutoencoderKL [64, 128, 128, 128], 112x128x112 patches, batch 2) passed "
            "12.3 GB of RAM 47 s into its first step, before completing it: a GPU recipe"),
        torchrun(bundle_run("train_diffusion.yaml", "multi_gpu.yaml", args=T1)): _GPUS,
        bundle_run("inference.yaml", "inference_anchor.yaml"): (
            "the 553 M-parameter anchor U-Net, DDIM 50 steps at full size: 245 s and 3.3 GB here on converted random "
            "weights (~4 s a step under load, 33 s decoding); the config chain runs with 2 steps on small converted "
            "weights in tests/test_model_zoo.py::test_readme_model_zoo_commands"),
        bundle_run("train_autoencoder.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml"): _BRAIN_DEMO,
        bundle_run("train_diffusion.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml"): _BRAIN_DEMO,
        bundle_run("train_distillation.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml",
                   "presets/demo_distill.yaml"): (
            "the demo cohort first (~11 min, as the demo recipe), then 4 rounds of 500 distillation steps (~50 min); "
            "the same config chain runs to its first step on the shipped teacher and 6 small subjects in "
            "tests/test_distillation.py::test_demo_preset_starts_on_the_shipped_teacher"),
        bundle_run("train_diffusion.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml", "presets/demo_flow.yaml"):
            _BRAIN_DEMO + "; the flow preset's merged config is checked in tests/test_flow_training.py",
        "python scripts/quality_vs_steps.py --codec models/autoencoder.pt --diffusion models/model.pt --datalist "
        "outputs/data/synthetic_healthy/datalist.json --out outputs/quality --configs ddim:50 dpmpp_2m:10 unipc:8 "
        "ddim:4:trailing student/ddim:4:trailing --model student=models/model_distilled.pt "
        "--seeds 3 --conditions 4 --n-per-condition 2": (
            "the quality sweep: the 64 real volumes measured (20 min), then 15 evaluations of 16 full-size samples "
            "(3-6 min each), ~80 min here, after the demo cohort (~11 min); the script end to end on a tiny pair and "
            "cohort (3 configurations, one of a second model, x 2 seeds, resumed, the real volumes measured once): "
            "tests/test_quality_vs_steps.py::test_sweep_end_to_end_resumes_and_measures_the_real_volumes_once"),
        "python scripts/bench_brain_ldm.py --threads 2 --out bench.json --configs reference ours_ddim ours_dpmpp "
        "ours_fast ours_student --dpm-steps 10 --fast unipc:8 --student-steps 4": (
            "the benchmark: five full-size anchor generations, 510 s on the quiet machine (the README's 2026-12-01 "
            "night figures), 12.8 GB peak for the reference; its --quick smoke run: tests/test_model_zoo.py::"
            "test_benchmark_quick_smoke"),
    },
    SEG: {
        bundle_run("train.yaml", args=BRATS): (
            "the PatchDDM recipe (16.8 M parameters, 128^3 patches of the 240x240x160 grid) passed 12.2 GB of RAM "
            "51 s into its first step, before completing it: a GPU recipe (the README's table: 96^3 needs 8 GB)"),
        torchrun(bundle_run("train.yaml", "multi_gpu.yaml", args=BRATS)): _GPUS,
    },
    ANOMALY: {
        torchrun(bundle_run("train_diffusion.yaml", "multi_gpu.yaml", args=T1)): _GPUS,
        bundle_run("train_autoencoder.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml"): _BRAIN_DEMO,
        bundle_run("train_diffusion.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml",
                   "presets/demo_conditional.yaml"): _BRAIN_DEMO,
        bundle_run("train_autoencoder.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml",
                   "presets/demo_vq.yaml", "vq_models.yaml"): _BRAIN_DEMO,
        bundle_run("train_diffusion.yaml", "data/synthetic_healthy.yaml", "presets/demo.yaml",
                   "presets/demo_vq.yaml", "vq_models.yaml"): _BRAIN_DEMO,
    },
    IMAGE: {
        torchrun(bundle_run("train.yaml", "multi_gpu.yaml", args=f"--datalist {SLICES}")): _GPUS,
        bundle_run("train.yaml", "data/synthetic_slices.yaml", "presets/demo.yaml"): (
            "the demo recipe: 3000 steps of batch 16 at ~1.3 steps per second, ~40 min on the 2 cores after ~1 min "
            "of data; the same config chain runs for one step on 6 small subjects in tests/test_bundle_conventions.py"
            "::test_demo_preset_reproduces_the_shipped_image_diffusion_recipe"),
    },
}


def readme(name: str) -> Path:
    return ROOT / "bundles" / name / "docs" / "README.md"


# ------------------------------------------------------------------------------------------------ coverage (fast)
@pytest.mark.parametrize("name", BUNDLES)
def test_every_readme_command_is_run_or_exempt(name):
    printed = printed_commands(readme(name))
    run = [c for bundle, commands in RUNS.values() if bundle == name for c in commands]
    exempt = EXEMPT[name]
    assert not set(run) & set(exempt), "a command both run and exempt"
    missing = [c for c in printed if c not in run and c not in exempt]
    assert not missing, f"{name} README commands no test runs and EXEMPT does not name: {missing}"
    stale = [c for c in [*run, *exempt] if c not in printed]
    assert not stale, f"listed here but not printed in the {name} README any more: {stale}"
    assert all(callable(globals().get(test)) for test in RUNS)


@pytest.mark.parametrize("name", BUNDLES)
def test_readme_placeholders_are_stated_shell_variables(name):
    """No command holds a path of the writer's machine or a ``<placeholder>``: only ``$DATA`` / ``$ZOO``, each
    explained in the README's prose ("`DATA` is the folder of your datasets", as tests/test_doc_commands.py asks of
    the repository's docs)."""
    prose = re.sub(r"```.*?```", "", readme(name).read_text(), flags=re.DOTALL)
    for command in printed_commands(readme(name)):
        assert not re.search(r"<\w+>|(^|[\s'\"])/data/", command), command
        for variable in re.findall(r"\$(\w+)", command):
            assert variable in PLACEHOLDERS and re.search(rf"`{variable}` (is )?the folder", prose), (variable, command)


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The folder ``$DATA`` (see the module docstring); ~1 min to write."""
    from meddiff3d.data.synthetic import write_cohort

    root = tmp_path_factory.mktemp("DATA")
    cohort = {"seed": 0, "source": "procedural", "progress": False}
    write_cohort("healthy", root / "t1", n=4, val_fraction=0.25, test_fraction=0.25, **cohort)
    doc = json.loads((root / "t1" / "datalist.json").read_text())
    shutil.copy(root / "t1" / doc["test"][0]["image"], root / "a.nii.gz")
    shutil.copy(root / "t1" / doc["validation"][0]["image"], root / "b.nii.gz")
    write_cohort("brats", root / "brats", n=1, val_fraction=0.0, test_fraction=0.0, **cohort)
    write_cohort("anomaly", root / "anomaly", n=1, val_fraction=0.0, test_fraction=1.0, **cohort)
    write_slices(root / "t1" / "datalist.json", root / "slices")
    return root


def write_slices(t1_datalist: Path, folder: Path) -> None:
    """``$DATA/slices``: 64x64 axial slices of the T1 cohort (8 per subject) as a 2D datalist, one test slice as
    ``slice.png``, and that slice's k-space (centred orthonormal FFT) with 3 of every 4 columns zeroed as
    ``kspace.npy``, its columns as ``mask.npy`` (0/1)."""
    from meddiff3d.data.images2d import read_image_2d
    from meddiff3d.data.slices import slice_datalist
    from meddiff3d.diffusion import cartesian_mask, fft2c

    slice_datalist(t1_datalist, folder, (64, 64), 8, progress=False)  # 16 training slices: one batch
    first = json.loads((folder / "datalist.json").read_text())["test"][0]["image"]
    shutil.copy(folder / first, folder / "slice.png")
    image = read_image_2d(folder / "slice.png")
    mask = cartesian_mask(64, 4, 0.08, "equispaced").numpy().astype(np.uint8)
    kspace = fft2c(torch.from_numpy(image.array / image.full_scale())).numpy() * mask
    np.save(folder / "kspace.npy", kspace.astype(np.complex64))
    np.save(folder / "mask.npy", mask)


@pytest.fixture
def commands(request) -> list[str]:
    """The README commands the requesting test runs (``RUNS`` under its name), in order."""
    return RUNS[request.node.originalname][1]


def run_ok(command: str, cwd: Path, **variables) -> str:
    result = run_as_printed(command, cwd, **variables)
    assert result.returncode == 0, (command, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, (command, result.stderr[-3000:])
    return result.stdout + result.stderr  # MONAI's logging.conf logs to stdout


def start_and_stop(command: str, cwd: Path, **variables) -> str:
    """Run a training command as printed until its first completed iteration, then stop it; its output."""
    result = run_until_first_step(command, cwd, **variables)
    assert result.stopped, (command, result.returncode, result.output[-3000:])
    return result.output


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def file_meta(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["meta"]


def sidecar(nifti: Path) -> dict:
    return json.loads(Path(str(nifti)[: -len(".nii.gz")] + ".json").read_text())


def assert_stopped_run(run_dir: Path, shipped: dict[str, str], models: Path) -> dict:
    """A run stopped after its first step left its folder (run meta, TensorBoard, log) and no partial file, and wrote
    nothing into the bundle's ``models/`` (``shipped``: file name -> sha256 before the run); the run's meta.json."""
    assert (run_dir / "meta.json").is_file() and (run_dir / "train.log").is_file(), sorted(run_dir.rglob("*"))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob(".*.tmp*")), "a partial file left behind"
    assert {p.name: sha256(p) for p in models.iterdir() if p.is_file()} == shipped
    return json.loads((run_dir / "meta.json").read_text())


def shipped_hashes(models: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in models.iterdir() if p.is_file()}


# ------------------------------------------------------------------------------------------------ brain_mri_ldm
@pytest.mark.slow
def test_ldm_generate_on_the_demo_weights(tmp_path, commands):
    """The five Generate commands on the shipped demo weights (1.5-2 min): files, shapes, the model's affine and the
    sidecars' settings; the distilled student samples on its own 4-step grid, close to its teacher's sample."""
    root = Bundle(LDM).copy_to(tmp_path / LDM, models=True)
    affine = np.asarray(file_meta(root / "models" / "model.pt")["image"]["affine"])
    out, shape = root / "outputs" / "generation", (160, 224, 160)
    default, dpm, guided, unconditional, student = commands

    run_ok(default, root)
    (path,) = check_generated(out, 1, shape, affine=affine)
    side = sidecar(path)
    own = file_meta(root / "models" / "model.pt")["sampling"]  # the demo's default: its quality table's choice
    assert path.name == "sample_seed0.nii.gz" and (side["sampler"], side["steps"]) == ("unipc", 8) == \
        (own["sampler"], own["steps"]) and side["timestep_spacing"] == "time_quadratic"
    assert side["covariates"] == {"sex": 1.0, "age": 0.5, "ventricular_volume": 0.3, "brain_volume": 0.6}
    teacher = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)  # the later commands overwrite seed 0

    run_ok(dpm, root)
    side = sidecar(check_generated(out, 1, shape, affine=affine)[0])
    assert side["sampler"] == "dpmpp_2m" and side["steps"] == 20 and side["timestep_spacing"] == "log_snr"

    run_ok(guided, root)
    for path in check_generated(out, 4, shape, affine=affine):
        side = sidecar(path)
        assert side["guidance_scale"] == 3 and side["covariates"]["age"] == 0.9, side

    run_ok(unconditional, root)
    check_generated(out, 5, shape, affine=affine)
    assert sidecar(out / "sample_seed7.nii.gz")["covariates"] is None

    run_ok(student, root)
    (path,) = check_generated(root / "outputs" / "student", 1, shape, affine=affine)
    side = sidecar(path)
    assert (side["sampler"], side["steps"], side["timestep_spacing"]) == ("ddim", 4, "trailing")
    assert side["covariates"] == {"sex": 1.0, "age": 0.5, "ventricular_volume": 0.3, "brain_volume": 0.6}
    own = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    brain = (teacher > 0.1) | (own > 0.1)
    assert np.corrcoef(teacher[brain], own[brain])[0, 1] > STUDENT_TEACHER_R  # the teacher's sample, same noise


@pytest.mark.slow
def test_ldm_diffusion_training_starts_on_a_datalist(tmp_path, data, commands):
    """The anchor recipe's diffusion training on a user datalist, on the shipped codec: started as printed and
    stopped after its first step (1.5-2 min, 11.9 GB peak: one step of the 553 M-parameter U-Net takes ~100 s)."""
    root = Bundle(LDM).copy_to(tmp_path / LDM, models=True)
    shipped = shipped_hashes(root / "models")
    start_and_stop(commands[0], root, DATA=data)
    run_dir = root / "outputs" / "runs" / LDM / "diffusion"
    meta = assert_stopped_run(run_dir, shipped, root / "models")["meta"]
    assert meta["network"]["args"]["channels"] == [256, 512, 768]  # the anchor U-Net
    assert meta["conditioning"]["covariates"] == ["sex", "age", "ventricular_volume", "brain_volume"]
    assert (run_dir / "latents" / "latents.pt").is_file()  # the datalist encoded once by the codec


@pytest.mark.slow
def test_ldm_tiny_preset_in_order(tmp_path, commands):
    """Train the autoencoder, train the diffusion model, generate: the tiny preset as printed (~1 min)."""
    root = Bundle(LDM).copy_to(tmp_path / LDM)
    train_ae, train_ldm, infer = commands
    run_ok(train_ae, root)
    assert (root / "models" / "autoencoder.pt").is_file()
    assert (root / "outputs" / "data" / "synthetic_healthy" / "datalist.json").is_file()  # under the current folder
    run_ok(train_ldm, root)
    meta = file_meta(root / "models" / "model.pt")
    assert meta["network"]["args"]["channels"] == [32, 64, 64]  # the tiny_cpu U-Net
    run_ok(infer, root)
    check_generated(root / "outputs" / "generation", 2, (32, 48, 32), affine=np.asarray(meta["image"]["affine"]))


def write_model_zoo_files(folder: Path) -> dict[str, torch.Tensor]:
    """The two files of the model-zoo bundle's ``models/`` at the anchor's architecture, random weights under the old
    GenerativeModels key names (2.2 GB); returns one tensor of each, by file name, to find in the conversion."""
    from meddiff3d.engine.checkpoint import build_network
    from meddiff3d.models.autoencoder import autoencoder_spec
    from meddiff3d.models.ldm import BRAIN_COVARIATES, latent_unet_spec
    from test_model_zoo import old_key

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    probes = {}
    specs = {"autoencoder.pt": autoencoder_spec("kl", "anchor"),
             "model.pt": latent_unet_spec(3, BRAIN_COVARIATES, "both", "anchor")}
    for name, spec in specs.items():
        state = build_network(spec).state_dict()
        key = next(k for k, v in state.items() if v.ndim == 5)  # a convolution kernel
        probes[name] = state[key][0].clone()
        torch.save({old_key(k): v for k, v in state.items()}, folder / name)
        del state
    return probes


@pytest.mark.slow
def test_ldm_convert_model_zoo(tmp_path, commands):
    """The conversion command as printed on model-zoo-format files of the anchor architecture (30-40 s, 5 GB peak)."""
    zoo = tmp_path / "zoo"
    probes = write_model_zoo_files(zoo / "brain_image_synthesis_latent_diffusion_model" / "models")
    root = Bundle(LDM).copy_to(tmp_path / LDM)
    run_ok(commands[0], root, ZOO=zoo)
    converted = root / "models" / "model_zoo"
    codec = torch.load(converted / "autoencoder.pt", map_location="cpu", weights_only=True)
    diffusion = torch.load(converted / "diffusion.pt", map_location="cpu", weights_only=True)
    meta = diffusion["meta"]
    assert meta["training"]["cond_dropout"] == 0 and meta["prediction"] == "epsilon"
    assert meta["image"]["shape"] == [160, 224, 160] and meta["image"]["orientation"] == "RAS"
    assert nib.aff2axcodes(np.asarray(meta["image"]["affine"])) == ("R", "A", "S")
    for name, weights in (("autoencoder.pt", codec["weights"]), ("model.pt", diffusion["ema"])):
        assert any(v.shape[1:] == probes[name].shape and torch.equal(v[0], probes[name]) for v in weights.values()
                   if v.ndim == 5), f"{name}: its weights are not in the conversion"


# ------------------------------------------------------------------------------------------------ brats_mri_segdiff
@pytest.mark.slow
def test_segdiff_on_the_demo_weights(tmp_path, data, commands):
    """The three Segment commands and Evaluate on the shipped demo weights, one BraTS-like case (2-3 min)."""
    root = Bundle(SEG).copy_to(tmp_path / SEG, models=True)
    datalist, out = data / "brats" / "datalist.json", root / "outputs" / "segmentation"
    (case,) = json.loads(datalist.read_text())["training"]
    default, quick, windows, evaluate = commands

    def info() -> dict:
        return json.loads((out / case["id"] / f"{case['id']}_segdiff.json").read_text())

    log = run_ok(default, root, DATA=data)
    assert "training 1 case(s)" in log, log[-2000:]  # the sections run and their cases are logged
    check_segmented(out, datalist, section=None)  # no --section: every section with items
    assert info()["num_samples"] == 5 and info()["sampler"] == "ddim" and info()["steps"] == 20

    run_ok(quick, root, DATA=data)
    check_segmented(out, datalist, section=None)
    assert info()["num_samples"] == 1 and info()["sampler"] == "dpmpp_2m" and info()["steps"] == 10

    run_ok(windows, root, DATA=data)
    check_segmented(out, datalist, section=None)
    assert info()["inference"]["sliding_window"]["roi_size"] == [48, 48, 48] and info()["num_samples"] == 1

    run_ok(evaluate, root, DATA=data)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [row["id"] for row in metrics["cases"]] == [case["id"]]
    assert (out / "metrics.csv").read_text().startswith("id,")


def tiny_segdiff_preset() -> dict:
    return Bundle(SEG).parse("common.yaml", "train.yaml", *(f"configs/{c}" for c in SEG_TINY)).get()


def test_segdiff_tiny_preset_is_minutes():
    """The README promises minutes: the preset's training is at most 50 iterations on a small grid (at 2000
    iterations on the 80x112x80 grid it took ~65 min here, plus 6 test cases at N = 5, 20 steps)."""
    preset = tiny_segdiff_preset()
    assert preset["max_iterations"] <= 50 and np.prod(preset["image_shape"]) <= 32 * 48 * 32, (
        preset["max_iterations"], preset["image_shape"])


@pytest.mark.slow
def test_segdiff_tiny_preset_in_order(tmp_path, commands):
    """Train, segment the held-out cases, evaluate: the tiny preset as printed (~25 s)."""
    preset = tiny_segdiff_preset()
    root = Bundle(SEG).copy_to(tmp_path / SEG)
    train, infer, evaluate = commands
    run_ok(train, root)
    meta = file_meta(root / "models" / "model.pt")
    assert meta["network"]["args"]["channels"] == [8, 16, 32, 32] and meta["image"]["shape"] == preset["image_shape"]
    assert meta["patch"]["size"] == preset["patch_size"] and meta["coordinates"]["full_shape"] == preset["image_shape"]
    datalist = root / "outputs" / "data" / "synthetic_brats" / "datalist.json"  # under the current folder
    out = root / "outputs" / "segmentation"
    run_ok(infer, root)
    check_segmented(out, datalist)
    run_ok(evaluate, root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["cases"]) == len(json.loads(datalist.read_text())["test"])
    assert (out / "metrics.csv").read_text().startswith("id,")


@pytest.mark.slow
def test_segdiff_demo_retraining_starts(tmp_path, commands):
    """The demo recipe as printed, stopped after its first step (~2 min: its 80-case cohort first): the run it
    started is the shipped model's, every setting of its meta equal to models/model.pt's but the datalist path and
    the format tag (``kind``: the shipped file has the older ``segmentation_diffusion``)."""
    root = Bundle(SEG).copy_to(tmp_path / SEG, models=True)
    shipped = shipped_hashes(root / "models")
    start_and_stop(commands[0], root)
    meta = assert_stopped_run(root / "outputs" / "runs" / SEG / "segdiff", shipped, root / "models")["meta"]
    expected = file_meta(root / "models" / "model.pt")
    for key in set(meta) | set(expected):
        if key not in ("training", "kind"):
            assert meta.get(key) == expected.get(key), key
    meta["training"].pop("datalist"), expected["training"].pop("datalist")
    assert meta["training"] == expected["training"]
    cohort = json.loads((root / "outputs" / "data" / "synthetic_brats" / "datalist.json").read_text())
    assert (cohort["synthetic"]["n"], cohort["synthetic"]["variant"]) == (80, "varied")


# ------------------------------------------------------------------------------------------------ brain_mri_anomaly_ldm
def check_detected(out: Path, inputs: dict[str, Path]) -> dict:
    """``out`` holds the detection outputs of ``inputs`` (id -> input file) on each input's grid; its summary."""
    for case, source in inputs.items():
        ref = nib.load(str(source))
        for suffix in ("_healed.nii.gz", "_anomaly_map.nii.gz", "_mask.nii.gz"):
            img = nib.load(str(out / f"{case}{suffix}"))
            assert img.shape == ref.shape, (case, suffix)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
        assert (out / f"{case}_preview.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(c["id"] for c in summary["cases"]) == sorted(inputs)
    return summary


@pytest.mark.slow
def test_anomaly_on_the_demo_weights(tmp_path, data, commands):
    """Calibrate (twice), Detect (four commands), Evaluate on the shipped demo weights, full-size inputs (~3 min).
    The calibrations run first, so the first two detections use the one-step calibration the second wrote (cheaper);
    the demo_models.yaml command uses the shipped record of the demo run, the vq_models.yaml one the VQ-VAE pair."""
    root = Bundle(ANOMALY).copy_to(tmp_path / ANOMALY, models=True)
    calibrate, calibrate_simplex, detect, detect_files, detect_demo, detect_vq, evaluate = commands
    t1 = json.loads((data / "t1" / "datalist.json").read_text())
    models = root / "models"

    run_ok(calibrate, root, DATA=data)
    calibration = json.loads((models / "calibration.json").read_text())
    assert calibration["settings"]["start_steps"] == [200, 350, 500] and calibration["settings"]["noise"] == "gaussian"
    assert (models / "calibration_autoencoder.json").is_file()
    run_ok(calibrate_simplex, root, DATA=data)
    calibration = json.loads((models / "calibration.json").read_text())
    assert calibration["settings"]["start_steps"] == [250] and calibration["settings"]["noise"] == "simplex"

    run_ok(detect, root, DATA=data)
    (item,) = t1["test"]
    check_detected(root / "outputs" / "anomaly", {item["id"]: data / "t1" / item["image"]})
    run_ok(detect_files, root, DATA=data)
    check_detected(root / "out", {"a": data / "a.nii.gz", "b": data / "b.nii.gz"})
    run_ok(detect_demo, root, DATA=data)
    summary = check_detected(root / "outputs" / "anomaly", {"a": data / "a.nii.gz"})
    assert summary["calibration"].endswith("models/demo/calibration.json")
    run_ok(detect_vq, root, DATA=data)  # the VQ-VAE pair with its own calibration, not the one calibrated above
    summary = check_detected(root / "out_vq", {"a": data / "a.nii.gz"})
    assert summary["calibration"].endswith("models/vq/calibration.json")
    assert summary["settings"]["start_steps"] == [200, 350, 500]

    run_ok(evaluate, root, DATA=data)
    evaluation = root / "outputs" / "evaluation"  # under the current folder
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"diffusion", "autoencoder"} and metrics["volumes"] == 1
    assert (evaluation / "summary.csv").is_file() and (evaluation / "per_volume.csv").is_file()


@pytest.mark.slow
def test_anomaly_training_starts_on_a_datalist(tmp_path, data, commands):
    """The default recipes on a user datalist, started as printed and stopped after their first step (~2 min,
    10.4 GB peak): the VQ-VAE, then the unconditional anchor U-Net on the shipped codec's latents."""
    root = Bundle(ANOMALY).copy_to(tmp_path / ANOMALY, models=True)
    shipped = shipped_hashes(root / "models")
    train_ae, train_ldm = commands
    runs = root / "outputs" / "runs" / ANOMALY
    start_and_stop(train_ae, root, DATA=data)
    meta = assert_stopped_run(runs / "autoencoder", shipped, root / "models")["meta"]
    assert meta["kind"] == "vq" and meta["patch_size"] == [96, 96, 96]  # the anchor VQ-VAE recipe
    assert meta["network"]["args"]["autoencoder"]["class"] == "monai.networks.nets.VQVAE"
    start_and_stop(train_ldm, root, DATA=data)
    meta = assert_stopped_run(runs / "diffusion", shipped, root / "models")["meta"]
    assert meta["conditioning"]["mode"] == "none" and meta["network"]["args"]["channels"] == [256, 512, 768]
    assert (runs / "diffusion" / "latents" / "latents.pt").is_file()


@pytest.mark.slow
def test_anomaly_tiny_preset_in_order(tmp_path, commands):
    """Train both models, calibrate, detect, evaluate: the tiny preset as printed (~1 min)."""
    root = Bundle(ANOMALY).copy_to(tmp_path / ANOMALY)
    train_ae, train_ldm, calibrate, detect, evaluate = commands
    run_ok(train_ae, root)
    assert file_meta(root / "models" / "autoencoder.pt")["network"]["class"] == "monai.networks.nets.VQVAE"
    run_ok(train_ldm, root)
    meta = file_meta(root / "models" / "model.pt")
    assert meta["conditioning"]["mode"] == "none" and meta["network"]["args"]["in_channels"] == 3
    run_ok(calibrate, root)
    calibration = json.loads((root / "models" / "calibration.json").read_text())
    assert calibration["settings"]["start_steps"] == [250, 400]  # configs/tiny_cpu.yaml's detector
    assert (root / "models" / "calibration_autoencoder.json").is_file()
    run_ok(detect, root)
    datalist = root / "outputs" / "data" / "synthetic_anomaly" / "datalist.json"
    test_items = json.loads(datalist.read_text())["test"]
    check_detected(root / "outputs" / "anomaly", {i["id"]: datalist.parent / i["image"] for i in test_items})
    run_ok(evaluate, root)
    metrics = json.loads((root / "outputs" / "evaluation" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"diffusion", "autoencoder"} and metrics["volumes"] == len(test_items)


# ------------------------------------------------------------------------------------------------ medical_2d_ddpm
def check_images_2d(out_dir: Path, names: list[str], shape, spacing) -> list[Path]:
    """``out_dir`` holds the 2D NIfTI files ``names``: float32 of ``shape`` (rows, columns; stored columns x rows)
    with the affine diag(-column spacing, -row spacing, 1) (Slicer shows them as the PNGs)."""
    paths = []
    for name in names:
        img = nib.load(str(out_dir / name))
        assert img.shape == (shape[1], shape[0]) and img.get_data_dtype() == np.float32, (name, img.shape)
        np.testing.assert_allclose(np.diag(img.affine)[:3], [-spacing[1], -spacing[0], 1.0], rtol=1e-5)
        paths.append(out_dir / name)
    return paths


def recon_record(out_dir: Path, case: str) -> dict:
    return json.loads((out_dir / f"{case}.json").read_text())


@pytest.mark.slow
def test_image_generate_and_reconstruct_on_the_demo_weights(tmp_path, data, commands):
    """Generation, k-space reconstruction (simulated 4x random and 8x equispaced masks, a .npy with its mask) and
    super-resolution (a simulated x4, a datalist section at x2) on the shipped demo weights (~1 min): files, sizes,
    affines, sidecars; the estimate keeps the measured k-space lines and beats zero filling and bicubic."""
    from meddiff3d.diffusion import fft2c

    root = Bundle(IMAGE).copy_to(tmp_path / IMAGE, models=True)
    meta = file_meta(root / "models" / "model.pt")
    shape, spacing = meta["image"]["shape"], meta["image"]["spacing"]
    default, guided, recon4, recon8, from_npy, sr4, sr_datalist = commands
    gen = root / "outputs" / "generation"
    run_ok(default, root, DATA=data)
    check_images_2d(gen, [f"sample_seed{s}.nii.gz" for s in range(8)], shape, spacing)
    side = sidecar(gen / "sample_seed0.nii.gz")
    assert (side["sampler"], side["steps"]) == (meta["sampling"]["sampler"], meta["sampling"]["steps"])
    assert side["class"] is None and (gen / "samples.png").is_file()
    run_ok(guided, root, DATA=data)
    side = sidecar(gen / "sample_seed3.nii.gz")
    assert side["class"] == "superior" and side["guidance_scale"] == 2

    out = root / "outputs" / "reconstruction"
    for command, kind in ((recon4, "random"), (recon8, "equispaced")):
        run_ok(command, root, DATA=data)
        check_images_2d(out, ["slice_recon.nii.gz", "slice_std.nii.gz", "slice_baseline.nii.gz"], shape, [1, 1])
        record = recon_record(out, "slice")
        assert record["simulated_mask"]["kind"] == kind and record["num_samples"] == 4
        recon, zero_filled = record["recon"], record["baseline"]
        # this slice is of the procedural phantom family, not the training anatomy: measured 29.7 vs 21.8 dB at 4x
        # random; 17.6 vs 16.6 dB, SSIM 0.57 vs 0.39 at 8x equispaced (8 lines + 3 central: coherent aliasing)
        if kind == "random":
            assert recon["psnr"] > zero_filled["psnr"] + 4, record
        else:
            assert recon["ssim"] > zero_filled["ssim"] + 0.1 and recon["nmse"] < zero_filled["nmse"], record
    run_ok(from_npy, root, DATA=data)
    record = recon_record(out, "kspace")
    assert "recon" not in record and record["mask"] == np.load(data / "slices" / "mask.npy").tolist()
    estimate = np.asarray(nib.load(str(out / "kspace_recon.nii.gz")).dataobj).T  # stored columns x rows
    measured = np.load(data / "slices" / "kspace.npy")
    kept = fft2c(torch.from_numpy(estimate.astype(np.float32))).numpy() * np.load(data / "slices" / "mask.npy")
    np.testing.assert_allclose(kept, measured, atol=2e-3 * np.abs(measured).max())  # the measured lines are kept

    run_ok(sr4, root, DATA=data)
    record = recon_record(out, "slice")
    assert record["factor"] == 4 and record["simulated_low_resolution"]
    assert record["recon"]["psnr"] > record["baseline"]["psnr"], record  # bicubic
    run_ok(sr_datalist, root, DATA=data)
    test_ids = [i["id"] for i in json.loads((data / "slices" / "datalist.json").read_text())["test"]]
    for case in test_ids:
        assert recon_record(out, case)["factor"] == 2


@pytest.mark.slow
def test_image_training_starts_on_a_datalist(tmp_path, data, commands):
    """The default recipe (the demo U-Net, batch 16) on a user's 2D datalist: started as printed, stopped after its
    first step (~30 s)."""
    root = Bundle(IMAGE).copy_to(tmp_path / IMAGE, models=True)
    shipped = shipped_hashes(root / "models")
    start_and_stop(commands[0], root, DATA=data)
    meta = assert_stopped_run(root / "outputs" / "runs" / IMAGE, shipped, root / "models")["meta"]
    assert meta["classes"] == ["inferior", "middle", "superior"]  # the datalist's own classes
    assert meta["network"]["args"]["channels"] == [32, 64, 128, 128] and meta["image"]["shape"] == [64, 64]


@pytest.mark.slow
def test_image_tiny_preset_in_order(tmp_path, commands):
    """Train, generate, reconstruct the synthetic test slices: the tiny preset as printed (~1 min)."""
    root = Bundle(IMAGE).copy_to(tmp_path / IMAGE)
    train, infer, recon = commands
    run_ok(train, root)
    meta = file_meta(root / "models" / "model.pt")
    assert meta["network"]["args"]["channels"] == [16, 32, 32] and meta["image"]["shape"] == [32, 32]
    slices = json.loads((root / "outputs" / "data" / "synthetic_slices" / "datalist.json").read_text())
    assert slices["spatial_dims"] == 2 and len(slices["training"]) == 6 * 4  # 6 training subjects, 4 slices each
    run_ok(infer, root)
    check_images_2d(root / "outputs" / "generation", [f"sample_seed{s}.nii.gz" for s in range(4)], [32, 32],
                    meta["image"]["spacing"])
    run_ok(recon, root)
    for item in slices["test"]:
        assert recon_record(root / "outputs" / "reconstruction", item["id"])["recon"]["nmse"] >= 0
