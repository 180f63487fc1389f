"""Hostile input, table-driven: every case must end with exit status 2 and one ``error:`` line naming the bad file
or value, no traceback, and nothing written, neither in the output folder nor anywhere else (the bundle folder, the
case's own folder).

The bundles run in this process as ``python -m monai.bundle run`` does (``runpy`` of MONAI's ``__main__`` with its
command line), an uncaught exception handled as the bundle's ``initialize`` hook handles it
(:func:`meddiff3d.pipelines.commands.report_user_errors`); ``tests/test_bundle_components.py`` runs the same in
subprocesses. The CLI runs through :func:`meddiff3d.cli.main`, the server's request layer through
:mod:`meddiff3d.label.bundles`. Every case fails before any compute, so the shipped demo weights serve.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import runpy
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
AFFINE_1MM = np.diag([1.0, 1.0, 1.0, 1.0])


# ------------------------------------------------------------------------------------------------ hostile files
def _nifti(path: Path, array, spacing=(1.0, 1.0, 1.0)) -> Path:
    img = nib.Nifti1Image(array, np.diag([*spacing, 1.0]))
    nib.save(img, str(path))
    return path


def _brain(shape=(40, 48, 40)) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    return np.clip(1.2 - np.sqrt((grid ** 2).sum(0)) * 1.5, 0, 1).astype(np.float32)


class PickleBomb:
    def __reduce__(self):
        return (os.system, ("touch /tmp/meddiff3d-hostile-pwned",))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    f: dict[str, Path] = {}
    brain = _brain()
    f["t1"] = _nifti(d / "t1.nii.gz", brain)
    f["zeros"] = _nifti(d / "zeros.nii.gz", np.zeros_like(brain))
    f["constant"] = _nifti(d / "constant.nii.gz", np.full_like(brain, 0.7))
    f["complex"] = _nifti(d / "complex.nii.gz", brain.astype(np.complex64))
    f["nan"] = _nifti(d / "nan.nii.gz", np.where(brain > 0.5, np.nan, brain).astype(np.float32))
    f["fine"] = _nifti(d / "fine.nii.gz", brain, (0.01, 0.01, 0.01))
    f["coarse"] = _nifti(d / "coarse.nii.gz", brain, (100.0, 100.0, 100.0))
    wide = np.zeros((300, 300, 300), np.uint8)
    wide[100:200, 100:200, 100:200] = 50
    f["wide"] = _nifti(d / "wide.nii.gz", wide, (10.0, 10.0, 10.0))  # 3 m across: 3000^3 voxels at 1 mm
    f["vol4d"] = _nifti(d / "vol4d.nii.gz", np.stack([brain, brain], -1))
    f["flat2d"] = _nifti(d / "flat2d.nii.gz", brain[:, :, 0])
    raw = gzip.compress(nib.Nifti1Image(brain, AFFINE_1MM).to_bytes())
    (d / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    f["truncated"] = d / "truncated.nii.gz"
    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.float32)
    header.set_qform(AFFINE_1MM, 1)
    header.set_sform(AFFINE_1MM, 1)
    (d / "huge_header.nii").write_bytes(header.binaryblock + b"\0" * 4)  # 352 bytes claiming 3.6 TiB
    f["huge_header"] = d / "huge_header.nii"
    (d / "garbage.nii.gz").write_bytes(b"this is not an image")
    f["garbage"] = d / "garbage.nii.gz"
    # model files that are not what they claim
    torch.save({"weights": PickleBomb()}, d / "bomb.pt", _use_new_zipfile_serialization=True)
    f["bomb"] = d / "bomb.pt"
    with open(d / "pickle.pt", "wb") as fh:
        pickle.dump({"a": 1}, fh)
    f["pickle"] = d / "pickle.pt"
    good = (LDM / "models" / "model.pt").read_bytes()
    (d / "truncated.pt").write_bytes(good[: len(good) // 3])
    f["truncated_pt"] = d / "truncated.pt"
    (d / "text.pt").write_text("not weights\n")
    f["text_pt"] = d / "text.pt"
    (d / "folder.pt").mkdir()
    f["folder_pt"] = d / "folder.pt"
    (d / "a_file").write_text("x")
    f["a_file"] = d / "a_file"
    # calibrations
    cal = json.loads((ANOMALY / "models" / "calibration.json").read_text())
    cal["models"]["codec"]["sha256"] = "0" * 64
    (d / "other_models_calibration.json").write_text(json.dumps(cal))
    f["other_cal"] = d / "other_models_calibration.json"
    (d / "broken_calibration.json").write_text("{not json")
    f["broken_cal"] = d / "broken_calibration.json"
    # BraTS-like cases (4 sequences) and datalists around them
    for name in ("c1", "c2"):
        (d / name).mkdir()
        for seq in ("t1", "t1ce", "t2", "flair"):
            _nifti(d / name / f"{name}_{seq}.nii.gz", brain * (1.0 + 0.1 * len(seq)), (2.0, 2.0, 2.0))

    def case(name, **over):
        item = {"id": name, "image": [str(d / name / f"{name}_{s}.nii.gz") for s in ("t1", "t1ce", "t2", "flair")]}
        item.update(over)
        return item

    def datalist(name, items, **sections):
        path = d / f"{name}.json"
        path.write_text(json.dumps({"modalities": ["t1", "t1ce", "t2", "flair"], "test": items, **sections}))
        f[name] = path

    seq = lambda key: [str(f[key])] * 4  # noqa: E731 - four copies of one hostile file
    datalist("dl_escape", [case("c1", id="../escaped")])
    datalist("dl_absolute", [case("c1", id="/tmp/meddiff3d-hostile-abs")])
    datalist("dl_control", [case("c1", id="c1\nrm")])
    datalist("dl_duplicate", [case("c1"), case("c2", id="c1")])
    datalist("dl_three", [case("c1", image=case("c1")["image"][:3])])
    datalist("dl_missing", [case("c1", image=[str(d / "nope.nii.gz")] * 4)])
    datalist("dl_zeros", [case("c1", image=seq("zeros"))])
    datalist("dl_complex", [case("c1", image=seq("complex"))])
    datalist("dl_nan", [case("c1", image=seq("nan"))])
    datalist("dl_fine", [case("c1", image=seq("fine"))])
    datalist("dl_truncated", [case("c1", image=seq("truncated"))])
    datalist("dl_huge", [case("c1", image=seq("huge_header"))])
    datalist("dl_mixed_grids", [case("c1", image=[str(f["t1"]), *case("c1")["image"][1:]])])
    datalist("dl_empty", [])
    datalist("dl_good", [case("c1")])
    (d / "dl_not_json.json").write_text("[1, 2")
    f["dl_not_json"] = d / "dl_not_json.json"
    datalist("dl_t1_escape", [{"id": "../../escaped", "image": str(f["t1"])}], modalities=None)
    # 2D images and k-space for medical_2d_ddpm (64x64 model)
    from PIL import Image

    slice_ = (_brain((64, 64, 3))[:, :, 1] * 60000).astype(np.uint16)
    Image.fromarray(slice_).save(d / "slice.png")
    f["png"] = d / "slice.png"
    Image.fromarray(np.stack([slice_ >> 8, np.zeros_like(slice_ >> 8), slice_ >> 9], -1).astype(np.uint8)).save(
        d / "rgb.png")
    f["rgb_png"] = d / "rgb.png"
    Image.fromarray(slice_[:30, :30]).save(d / "small.png")
    f["small_png"] = d / "small.png"
    kspace = np.fft.fftshift(np.fft.fft2(slice_ / 60000.0)).astype(np.complex64)
    for name, array in (("k_real", kspace.real.copy()), ("k_small", kspace[:32, :32].copy()),
                        ("k_nan", np.where(np.abs(kspace) > 1, np.nan, kspace).astype(np.complex64)),
                        ("mask_values", np.full(64, 2, np.uint8)), ("k_good", kspace)):
        np.save(d / f"{name}.npy", array)
        f[name] = d / f"{name}.npy"
    np.save(d / "k_pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    f["k_pickle"] = d / "k_pickle.npy"
    (d / "dl2d_escape.json").write_text(json.dumps({"spatial_dims": 2, "modalities": ["t1"], "test": [
        {"id": "../escaped", "image": str(f["png"])}]}))
    f["dl2d_escape"] = d / "dl2d_escape.json"
    f["dir"] = d
    return f


# ------------------------------------------------------------------------------------------------ runners
def _snapshot(*folders: Path) -> set[Path]:
    return {p for folder in folders if folder.exists() for p in folder.rglob("*")}


def run_bundle(bundle: Path, configs: list[str], args: list[str], monkeypatch) -> tuple[int, str]:
    """``python -m monai.bundle run --config_file [...] --bundle_root B ARGS`` in this process; (status, stderr).

    stderr is a fresh buffer per run (not pytest's capsys, whose streams close after each test while MONAI's
    loggers keep the handler they made on first use)."""
    from meddiff3d.pipelines.commands import _exit_for_user_error
    import monai.bundle

    main = str(Path(monai.bundle.__file__).parent / "__main__.py")
    config_files = repr([str(bundle / "configs" / c) for c in configs])
    monkeypatch.setattr(sys, "argv", [main, "run", "--config_file", config_files, "--bundle_root", str(bundle),
                                      "--logging_file", "False", *args])  # handlers would outlive capsys' streams
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    code = 0
    try:
        try:
            runpy.run_path(main, run_name="__main__")
        except Exception as err:  # noqa: BLE001 - what the initialize hook does with an uncaught exception
            _exit_for_user_error(err)
            raise
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    return code, stderr.getvalue()


def assert_refused(code: int, stderr: str, expected: str) -> None:
    """Exit 2, no traceback, one ``error:`` line (a datalist with several problems lists them on indented lines
    below it), naming ``expected``."""
    lines = stderr.splitlines()
    errors = [i for i, ln in enumerate(lines) if re.match(r"(meddiff3d[\w -]*: )?error: ", ln)]  # argparse's prefix
    assert code == 2, f"exit status {code}; stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    message = [lines[errors[0]]] + [ln for ln in lines[errors[0] + 1:] if ln.startswith("  ")]
    assert expected in "\n".join(message), f"{expected!r} not in {message!r}"
    if os.environ.get("MEDDIFF3D_SHOW_ERRORS"):
        print("SHOWN", message[0][:230], file=sys.__stdout__)


# ------------------------------------------------------------------------------------------------ the table
G = (LDM, ["inference.yaml"])
S = (SEG, ["inference.yaml"])
A = (ANOMALY, ["inference.yaml"])
I = (IMAGE, ["inference.yaml"])
R = (IMAGE, ["common.yaml", "reconstruct.yaml"])
#: (case id, (bundle, configs), args(files) -> list, expected text of the error line)
CASES = [
    # --- generation: settings
    ("gen-steps-0", G, lambda f: ["--steps", "0"], "steps must be an integer >= 1, got 0"),
    ("gen-steps-negative", G, lambda f: ["--steps", "-3"], "steps must be an integer >= 1, got -3"),
    ("gen-steps-fraction", G, lambda f: ["--steps", "1.5"], "steps must be an integer"),
    ("gen-steps-text", G, lambda f: ["--steps", "many"], "steps must be an integer"),
    ("gen-steps-too-many", G, lambda f: ["--steps", "5000"], "steps must be in [1, 1000]"),
    ("gen-sampler", G, lambda f: ["--sampler", "plms"], "unknown sampler 'plms'"),
    ("gen-num-samples-0", G, lambda f: ["--num_samples", "0"], "num_samples must be an integer >= 1, got 0"),
    ("gen-num-samples-huge", G, lambda f: ["--num_samples", "1000000000"], "num_samples=1000000000"),
    ("gen-batch-size-0", G, lambda f: ["--batch_size", "0"], "batch_size must be an integer >= 1, got 0"),
    ("gen-batch-size-huge", G, lambda f: ["--batch_size", "100000", "--num_samples", "100000"], "batch_size=100000"),
    ("gen-guidance-negative", G, lambda f: ["--guidance_scale", "-1"], "guidance_scale must be a finite number"),
    ("gen-guidance-nan", G, lambda f: ["--guidance_scale", "nan"], "guidance_scale must be a finite number"),
    ("gen-guidance-unconditional", G, lambda f: ["--guidance_scale", "3", "--covariates", "null"],
     "guidance_scale=3 needs conditional sampling"),
    ("gen-covariate-range", G, lambda f: ["--covariates#age", "1.5"], "age=1.5 is outside [0, 1]"),
    ("gen-covariate-unknown", G, lambda f: ["--covariates#agee", "0.5"], "unknown covariate(s) ['agee']"),
    ("gen-covariate-text", G, lambda f: ["--covariates#age", "old"], "age"),
    ("gen-seed-negative", G, lambda f: ["--seed", "-1"], "seed must be an integer >= 0, got -1"),
    ("gen-amp-unknown", G, lambda f: ["--amp", "fp8"], "unknown amp 'fp8'"),
    ("gen-amp-fp16-cpu", G, lambda f: ["--amp", "fp16", "--device", "cpu"], "amp 'fp16' needs a CUDA device"),
    ("gen-device-unknown", G, lambda f: ["--device", "tpu"], "unknown device 'tpu'"),
    ("gen-decode-tile-zero", G, lambda f: ["--decode_tile", "[0,4,4]"], "decode_tile"),
    ("gen-decode-tile-2d", G, lambda f: ["--decode_tile", "[4,4]"], "decode_tile"),
    ("gen-unknown-key", G, lambda f: ["--stepz", "5"], "unknown config key --stepz"),
    ("gen-unknown-component-arg", G, lambda f: ["--inferer#stepz", "5"], "takes no argument 'stepz'"),
    # --- generation: model files
    ("gen-model-missing", G, lambda f: ["--diffusion_path", str(f["dir"] / "none.pt")], "none.pt does not exist"),
    ("gen-model-is-codec", G, lambda f: ["--diffusion_path", str(LDM / "models" / "autoencoder.pt")], "autoencoder.pt"),
    ("gen-codec-is-model", G, lambda f: ["--codec_path", str(LDM / "models" / "model.pt")], "model.pt"),
    ("gen-model-bomb", G, lambda f: ["--diffusion_path", str(f["bomb"])], "bomb.pt"),
    ("gen-model-pickle", G, lambda f: ["--diffusion_path", str(f["pickle"])], "pickle.pt"),
    ("gen-model-truncated", G, lambda f: ["--diffusion_path", str(f["truncated_pt"])], "truncated.pt"),
    ("gen-model-text", G, lambda f: ["--diffusion_path", str(f["text_pt"])], "text.pt"),
    ("gen-model-folder", G, lambda f: ["--diffusion_path", str(f["folder_pt"])], "folder.pt"),
    ("gen-codec-bomb", G, lambda f: ["--codec_path", str(f["bomb"])], "bomb.pt"),
    # --- generation: output folder
    ("gen-output-is-file", G, lambda f: ["--output_dir", str(f["a_file"])], "a_file"),
    ("gen-output-inside-file", G, lambda f: ["--output_dir", str(f["a_file"] / "out")], "a_file"),
    # --- segmentation: datalists and images
    ("seg-datalist-missing", S, lambda f: ["--datalist", str(f["dir"] / "none.json")], "none.json"),
    ("seg-datalist-not-json", S, lambda f: ["--datalist", str(f["dl_not_json"])], "dl_not_json.json"),
    ("seg-id-escapes", S, lambda f: ["--datalist", str(f["dl_escape"])], "'../escaped' is not a safe file name"),
    ("seg-id-absolute", S, lambda f: ["--datalist", str(f["dl_absolute"])], "is not a safe file name"),
    ("seg-id-control", S, lambda f: ["--datalist", str(f["dl_control"])], "is not a safe file name"),
    ("seg-id-duplicate", S, lambda f: ["--datalist", str(f["dl_duplicate"])], "c1"),
    ("seg-section-empty", S, lambda f: ["--datalist", str(f["dl_empty"])], "test"),
    ("seg-section-unknown", S, lambda f: ["--datalist", str(f["dl_good"]), "--section", "testing"], "testing"),
    ("seg-three-sequences", S, lambda f: ["--datalist", str(f["dl_three"])], "4"),
    ("seg-image-missing", S, lambda f: ["--datalist", str(f["dl_missing"])], "nope.nii.gz"),
    ("seg-image-zeros", S, lambda f: ["--datalist", str(f["dl_zeros"])], "zeros.nii.gz"),
    ("seg-image-complex", S, lambda f: ["--datalist", str(f["dl_complex"])], "complex.nii.gz"),
    ("seg-image-nan", S, lambda f: ["--datalist", str(f["dl_nan"])], "nan.nii.gz"),
    ("seg-image-spacing", S, lambda f: ["--datalist", str(f["dl_fine"])], "fine.nii.gz"),
    ("seg-image-truncated", S, lambda f: ["--datalist", str(f["dl_truncated"])], "truncated.nii.gz"),
    ("seg-image-huge-header", S, lambda f: ["--datalist", str(f["dl_huge"])], "huge_header.nii"),
    ("seg-mixed-grids", S, lambda f: ["--datalist", str(f["dl_mixed_grids"])], "t1.nii.gz"),
    ("seg-num-samples-huge", S, lambda f: ["--datalist", str(f["dl_good"]), "--num_samples", "100000"],
     "num_samples=100000"),
    ("seg-threshold", S, lambda f: ["--datalist", str(f["dl_good"]), "--threshold", "1.5"], "threshold"),
    ("seg-overlap", S, lambda f: ["--datalist", str(f["dl_good"]), "--overlap", "1"], "overlap"),
    ("seg-roi-size", S, lambda f: ["--datalist", str(f["dl_good"]), "--roi_size", "[3,3,3]"], "roi_size"),
    ("seg-sw-batch", S, lambda f: ["--datalist", str(f["dl_good"]), "--sw_batch_size", "0"], "sw_batch_size"),
    ("seg-model-is-ldm", S, lambda f: ["--datalist", str(f["dl_good"]), "--model_path", str(LDM / "models" / "model.pt")],
     "model.pt"),
    ("seg-output-is-file", S, lambda f: ["--datalist", str(f["dl_good"]), "--output_dir", str(f["a_file"])], "a_file"),
    ("seg-unknown-key", S, lambda f: ["--datalist", str(f["dl_good"]), "--num_sample", "2"], "did you mean"),
    # --- anomaly detection
    ("ano-input-missing", A, lambda f: ["--inputs", repr([str(f["dir"] / "none.nii.gz")])], "none.nii.gz"),
    ("ano-input-zeros", A, lambda f: ["--inputs", repr([str(f["zeros"])])], "zeros.nii.gz"),
    ("ano-input-constant", A, lambda f: ["--inputs", repr([str(f["constant"])])], "constant.nii.gz"),
    ("ano-input-complex", A, lambda f: ["--inputs", repr([str(f["complex"])])], "complex.nii.gz"),
    ("ano-input-fine", A, lambda f: ["--inputs", repr([str(f["fine"])])], "fine.nii.gz"),
    ("ano-input-coarse", A, lambda f: ["--inputs", repr([str(f["coarse"])])], "coarse.nii.gz"),
    ("ano-input-4d", A, lambda f: ["--inputs", repr([str(f["vol4d"])])], "vol4d.nii.gz"),
    ("ano-input-resampled-too-big", A, lambda f: ["--inputs", repr([str(f["wide"])])], "wide.nii.gz"),
    ("ano-input-2d", A, lambda f: ["--inputs", repr([str(f["flat2d"])])], "flat2d.nii.gz"),
    ("ano-input-garbage", A, lambda f: ["--inputs", repr([str(f["garbage"])])], "garbage.nii.gz"),
    ("ano-input-huge-header", A, lambda f: ["--inputs", repr([str(f["huge_header"])])], "huge_header.nii"),
    ("ano-good-then-bad", A, lambda f: ["--inputs", repr([str(f["t1"]), str(f["zeros"])])], "zeros.nii.gz"),
    ("ano-id-escapes", A, lambda f: ["--inputs", str(f["dl_t1_escape"])], "is not a safe file name"),
    ("ano-calibration-missing", A, lambda f: ["--inputs", repr([str(f["t1"])]), "--calibration_path",
                                              str(f["dir"] / "none.json")], "none.json"),
    ("ano-calibration-broken", A, lambda f: ["--inputs", repr([str(f["t1"])]), "--calibration_path",
                                             str(f["broken_cal"])], "broken_calibration.json"),
    ("ano-calibration-other-models", A, lambda f: ["--inputs", repr([str(f["t1"])]), "--calibration_path",
                                                   str(f["other_cal"])], "recalibrate"),
    ("ano-output-is-file", A, lambda f: ["--inputs", repr([str(f["t1"])]), "--output_dir", str(f["a_file"])],
     "a_file"),
    ("ano-unknown-key", A, lambda f: ["--input", repr([str(f["t1"])])], "did you mean"),
    # --- 2D generation
    ("img-class-unknown", I, lambda f: ["--class_name", "lateral"], "unknown class 'lateral'"),
    ("img-guidance-unconditional", I, lambda f: ["--guidance_scale", "2"], "guidance_scale needs a class"),
    ("img-num-samples-0", I, lambda f: ["--num_samples", "0"],
     "num_samples must be an integer >= 1 and <= 100000, got 0"),
    ("img-steps-0", I, lambda f: ["--steps", "0"], "steps must be an integer >= 1, got 0"),
    ("img-model-is-ldm", I, lambda f: ["--model_path", str(LDM / "models" / "model.pt")], "model.pt"),
    ("img-model-bomb", I, lambda f: ["--model_path", str(f["bomb"])], "bomb.pt"),
    ("img-unknown-key", I, lambda f: ["--class", "middle"], "unknown config key --class"),
    # --- 2D reconstruction (k-space, super-resolution)
    ("rec-input-missing", R, lambda f: ["--inputs", repr([str(f["dir"] / "none.png")])], "none.png"),
    ("rec-kspace-real", R, lambda f: ["--inputs", repr([str(f["k_real"])])], "must be a complex"),
    ("rec-kspace-size", R, lambda f: ["--inputs", repr([str(f["k_small"])])], "k_small.npy"),
    ("rec-kspace-nan", R, lambda f: ["--inputs", repr([str(f["k_nan"])])], "non-finite"),
    ("rec-kspace-pickle", R, lambda f: ["--inputs", repr([str(f["k_pickle"])])], "k_pickle.npy: unreadable"),
    ("rec-mask-values", R, lambda f: ["--inputs", repr([str(f["k_good"])]), "--mask", str(f["mask_values"])],
     "the mask must be 0/1"),
    ("rec-mask-with-image", R, lambda f: ["--inputs", repr([str(f["png"])]), "--mask", str(f["mask_values"])],
     "--mask goes with a k-space"),
    ("rec-image-rgb", R, lambda f: ["--inputs", repr([str(f["rgb_png"])])], "rgb.png"),
    ("rec-image-size", R, lambda f: ["--inputs", repr([str(f["small_png"])])], "small.png"),
    ("rec-good-then-bad", R, lambda f: ["--inputs", repr([str(f["png"]), str(f["k_nan"])])], "k_nan.npy"),
    ("rec-acceleration", R, lambda f: ["--inputs", repr([str(f["png"])]), "--acceleration", "0.5"], "acceleration"),
    ("rec-task-unknown", R, lambda f: ["--inputs", repr([str(f["png"])]), "--task", "denoise"], "task"),
    ("rec-factor", R, lambda f: ["--inputs", repr([str(f["png"])]), "--task", "super_resolution", "--factor", "3"],
     "--factor 3"),
    ("rec-id-escapes", R, lambda f: ["--inputs", str(f["dl2d_escape"])], "is not a safe file name"),
    ("rec-output-is-file", R, lambda f: ["--inputs", repr([str(f["png"])]), "--output_dir", str(f["a_file"])],
     "a_file"),
]


@pytest.mark.parametrize("case, bundle_configs, make_args, expected", CASES, ids=[c[0] for c in CASES])
def test_bundle_refuses(case, bundle_configs, make_args, expected, files, tmp_path, monkeypatch):
    bundle, configs = bundle_configs
    out = tmp_path / "out"
    args = make_args(files)
    if "--output_dir" not in args:
        args += ["--output_dir", str(out)]
    before = _snapshot(tmp_path, files["dir"], bundle)
    code, stderr = run_bundle(bundle, configs, args, monkeypatch)
    assert_refused(code, stderr, expected)
    assert not out.exists(), sorted(out.rglob("*"))
    assert _snapshot(tmp_path, files["dir"], bundle) == before  # nothing written anywhere we can see
    for outside in (tmp_path.parent / "escaped", Path("/tmp/meddiff3d-hostile-abs"), Path("/tmp/meddiff3d-hostile-pwned")):
        assert not outside.exists(), outside


# ------------------------------------------------------------------------------------------------ the CLI
#: (case id, argv(files, tmp_path) -> list, expected text of the error line); output folders under tmp_path/out
CLI_CASES = [
    ("cli-synth-huge-shape", lambda f, t: ["synth", "healthy", "--n", "2", "--out", str(t / "out"), "--shape", "10000", "10000",
                                           "10000"], "10000"),
    ("cli-synth-out-is-file", lambda f, t: ["synth", "healthy", "--n", "1", "--out", str(f["a_file"]), "--shape", "32", "48",
                                            "32"], "a_file"),
    ("cli-synth-n-zero", lambda f, t: ["synth", "healthy", "--n", "0", "--out", str(t / "out")], "0"),
    ("cli-t1-truncated", lambda f, t: ["datalist", "t1", str(_folder(t, "truncated", f["truncated"])), "--out",
                                       str(t / "out")], "sub01.nii.gz: unreadable or truncated"),
    ("cli-t1-zeros", lambda f, t: ["datalist", "t1", str(_folder(t, "zeros", f["zeros"])), "--out", str(t / "out")],
     "sub01.nii.gz: all voxels are 0"),
    ("cli-t1-symlink-loop", lambda f, t: ["datalist", "t1", str(_loop(t)), "--out", str(t / "out")], "loop"),
    ("cli-t1-missing-folder", lambda f, t: ["datalist", "t1", str(t / "none"), "--out", str(t / "out")], "none"),
    ("cli-t1-out-is-file", lambda f, t: ["datalist", "t1", str(_folder(t, "t1", f["t1"])), "--out", str(f["a_file"])],
     "a_file"),
    ("cli-brats-missing-folder", lambda f, t: ["datalist", "brats", str(t / "none"), "--out", str(t / "out" / "d.json")],
     "none"),
    ("cli-validate-escape", lambda f, t: ["datalist", "validate", str(f["dl_escape"])], "'../escaped'"),
    ("cli-validate-not-json", lambda f, t: ["datalist", "validate", str(f["dl_not_json"])], "dl_not_json.json"),
    ("cli-convert-bomb", lambda f, t: ["convert-model-zoo", str(f["bomb"]), str(f["bomb"]), str(t / "out")],
     "bomb.pt"),
]


def _folder(tmp_path: Path, name: str, image: Path) -> Path:
    folder = tmp_path / f"in_{name}"
    folder.mkdir()
    (folder / f"sub01{''.join(image.suffixes)}").write_bytes(image.read_bytes())
    return folder


def _loop(tmp_path: Path) -> Path:
    folder = tmp_path / "in_loop"
    folder.mkdir()
    (folder / "loop").symlink_to(folder / "loop")
    return folder


@pytest.mark.parametrize("case, make_argv, expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(case, make_argv, expected, files, tmp_path, capsys):
    from meddiff3d.cli import main

    argv = make_argv(files, tmp_path)
    before = _snapshot(tmp_path, files["dir"])
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    assert_refused(code, capsys.readouterr().err, expected)
    assert not (tmp_path / "out").exists()
    assert _snapshot(tmp_path, files["dir"]) == before


# ------------------------------------------------------------------------------------------------ the server
# The request layer of the MONAI Label app (what turns into a 422 there; tests/test_label_server.py sends the same
# through HTTP in the MONAI Label environment).
def _server_params(text):
    from meddiff3d.label.params import parse_params_json

    return parse_params_json(text)


def _server_grid(path):
    from meddiff3d.label.request import check_input_grid

    return check_input_grid(path)


def _server_upload(name, folder):
    from meddiff3d.label.request import save_upload

    return save_upload(io.BytesIO(b"x"), name, folder)


SERVER_CASES = [
    ("srv-params-malformed", lambda f, t: _server_params("{steps: 2"), "params"),
    ("srv-params-list", lambda f, t: _server_params("[1, 2]"), "params"),
    ("srv-params-string", lambda f, t: _server_params('"steps"'), "params"),
    ("srv-header-bomb", lambda f, t: _server_grid(f["huge_header"]), "huge_header.nii"),
    ("srv-upload-escape", lambda f, t: _server_upload("..", t / "out"), "not a safe file name"),
    ("srv-upload-control", lambda f, t: _server_upload("a\nb.nii.gz", t / "out"), "not a safe file name"),
]


@pytest.mark.parametrize("case, call, expected", SERVER_CASES, ids=[c[0] for c in SERVER_CASES])
def test_server_request_layer_refuses(case, call, expected, files, tmp_path):
    from meddiff3d.errors import InputError

    before = _snapshot(tmp_path, files["dir"])
    with pytest.raises(InputError) as info:
        call(files, tmp_path)
    assert expected in str(info.value) and "\n" not in str(info.value).strip()
    assert _snapshot(tmp_path, files["dir"]) == before


def test_the_table_covers_every_kind_of_the_issue():
    """At least 60 cases, each kind of failure issue 13 found among them."""
    names = [c[0] for c in CASES] + [c[0] for c in CLI_CASES] + [c[0] for c in SERVER_CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    for kind in ("id-escapes", "t1-truncated", "t1-symlink-loop", "ano-input-zeros", "ano-input-fine",
                 "ano-input-complex", "guidance-unconditional", "unknown-key", "output-is-file", "num-samples-huge",
                 "synth-huge-shape", "ano-input-coarse", "codec-bomb", "model-is-codec", "validate-escape",
                 "header-bomb", "params-malformed", "ano-good-then-bad", "resampled-too-big"):
        assert any(kind in n for n in names), kind
