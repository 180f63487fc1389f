"""The task commands (``meddiff3d generate``, ``segment``, ``detect``, ``calibrate``: :mod:`meddiff3d.tasks`) on plain
inputs: what each kind of ``-i`` becomes for the bundle (fast: the bundle run replaced by a probe), end-to-end runs
with the shipped demo weights and the smallest settings (outputs, names, exit status 0, nothing written into the
bundle), and bad inputs (exit status 2, one ``error:`` line, nothing written).

Inputs are tiny synthetic cohorts (:func:`meddiff3d.data.synthetic.write_cohort`, 32x48x32 procedural; one T1 also
as a DICOM series, written as ``tests/test_datalist_readers.py`` writes one); the anomaly bundle works on its model
grid whatever the input, so detection uses a calibration cut to one starting step and 2 DDIM steps (as
``tests/test_bundle_components.py``'s ``fast_anomaly_bundle`` does), passed with ``--calibration``. The commands run
in this process through :func:`meddiff3d.cli.main`, in a temporary current folder (the default outputs go to
``./outputs/<task>``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from bundle_testing import ROOT

BUNDLES = ROOT / "bundles"
LDM, SEG, ANOMALY = (BUNDLES / n for n in ("brain_mri_ldm", "brats_mri_segdiff", "brain_mri_anomaly_ldm"))
FAST = ["--device", "cpu", "--amp", "none"]
SEG_FILES = ("seg.nii.gz", "prob.nii.gz", "variance.nii.gz", "entropy.nii.gz", "preview.png", "segdiff.json")
ANOMALY_FILES = ("healed.nii.gz", "anomaly_map.nii.gz", "mask.nii.gz", "preview.png")


# ------------------------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    """Two BraTS-like cases: the cohort's datalist (one training, one test case) and ``cases/<id>/<id>_<seq>.nii.gz``
    copies (BraTS 2021 naming, the layout a user brings)."""
    from meddiff3d.data.synthetic import write_cohort

    root = tmp_path_factory.mktemp("brats")
    summary = write_cohort("brats", root / "cohort", n=2, seed=1, shape=(32, 48, 32), source="procedural",
                           val_fraction=0.0, test_fraction=0.5, progress=False)
    cases = root / "cases"
    for image in sorted((root / "cohort" / "images").glob("*.nii.gz")):
        case = image.name.rsplit("_", 1)[0]
        (cases / case).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, cases / case / image.name)
    ids = sorted(p.name for p in cases.iterdir())
    return SimpleNamespace(datalist=summary.datalist, cases=cases, ids=ids)


@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    """Two healthy T1 volumes in ``images/`` (ids ``sub-000N_t1``) and their datalist (training 1, validation 1)."""
    from meddiff3d.data.synthetic import write_cohort

    root = tmp_path_factory.mktemp("t1")
    summary = write_cohort("healthy", root, n=2, seed=2, shape=(32, 48, 32), source="procedural", val_fraction=0.5,
                           progress=False)
    files = sorted((root / "images").glob("*.nii.gz"))
    return SimpleNamespace(datalist=summary.datalist, folder=root / "images", files=files)


@pytest.fixture(scope="module")
def fast_calibration(tmp_path_factory):
    """The shipped calibration cut to one starting step, 2 DDIM steps, no resampling (same model hashes)."""
    cal = json.loads((ANOMALY / "models" / "calibration.json").read_text())
    cal["settings"].update(start_steps=cal["settings"]["start_steps"][:1], steps=2, resample=1)
    cal["mask_thresholds"], cal["residual_stats"] = cal["mask_thresholds"][:1], cal["residual_stats"][:1]
    path = tmp_path_factory.mktemp("calibration") / "fast_calibration.json"
    path.write_text(json.dumps(cal))
    return path


@pytest.fixture(scope="module")
def dicom(t1, tmp_path_factory):
    """The first T1 volume as a DICOM series (int16, one file a slice): ``series`` one series folder (id
    ``sub-dicom``), ``parent`` a folder of two series sub-folders, and folders that are neither: ``two_series`` (the
    slices of two series side by side), ``beside_nifti`` (a series' slices beside a NIfTI file), ``not_dicom`` (a
    NIfTI file beside a ``.dcm`` file that is no DICOM)."""
    import SimpleITK as sitk
    from test_datalist_readers import write_dicom_series

    root = tmp_path_factory.mktemp("dicom")
    image = nib.load(t1.files[0])
    data = np.asarray(image.dataobj, dtype=np.float32)
    data = np.round(data / data.max() * 1000).astype(np.int16)
    series = write_dicom_series(data, image.affine, root / "sub-dicom")
    for name in ("a", "b"):
        shutil.copytree(series, root / "parent" / name)
    shutil.copytree(series, root / "two_series")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, slice_file in enumerate(sorted(series.iterdir())):  # the same slices as another series
        slice_ = sitk.ReadImage(str(slice_file))
        slice_.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.9")
        writer.SetFileName(str(root / "two_series" / f"other{k:03d}.dcm"))
        writer.Execute(slice_)
    shutil.copytree(series, root / "beside_nifti")
    (root / "not_dicom").mkdir()
    for folder in ("beside_nifti", "not_dicom"):
        shutil.copy(t1.files[0], root / folder / t1.files[0].name)
    (root / "not_dicom" / "notes.dcm").write_text("not a DICOM file")
    return SimpleNamespace(series=series, parent=root / "parent", two_series=root / "two_series",
                           beside_nifti=root / "beside_nifti", not_dicom=root / "not_dicom", shape=data.shape)


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh current folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(capsys, *argv: str) -> SimpleNamespace:
    """``meddiff3d ARGV`` in this process: exit status, stdout, the ``error:`` lines of stderr."""
    from meddiff3d.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return SimpleNamespace(code=code, out=out, err=err, errors=[ln for ln in err.splitlines() if "error:" in ln])


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ------------------------------------------------------------------------------------------------ the commands
def test_every_flag_is_in_its_commands_table():
    """Each command's --help ends with the one table of its flags and config keys; every option is in it."""
    from meddiff3d.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for name in ("generate", "segment", "detect", "calibrate"):
        parser = commands[name]
        assert parser.epilog.startswith("flag "), name
        table = parser.epilog.splitlines()
        for action in parser._actions:
            long = [o for o in action.option_strings if o.startswith("--") and o != "--help"]
            if long:
                assert any(ln.startswith(long[0] + " ") or f", {long[0]} " in ln for ln in table), (name, long[0])
        assert parser.format_help().rstrip().endswith(table[-1])


@pytest.mark.parametrize("kind, folder", [("generation", LDM), ("segmentation", SEG), ("anomaly", ANOMALY)])
def test_bundle_defaults_to_the_shipped_one_and_is_recognised_by_its_evaluator(kind, folder, tmp_path):
    from meddiff3d.tasks.bundle import find_bundle

    assert find_bundle(None, kind, "x") == folder
    assert find_bundle(folder.name, kind, "x") == folder  # a shipped bundle's name
    copy = tmp_path / "renamed"
    shutil.copytree(folder / "configs", copy / "configs")  # a renamed copy: the kind is its evaluator's
    assert find_bundle(str(copy), kind, "x") == copy


@pytest.fixture
def probe(monkeypatch):
    """Replace the bundle run by a probe recording ``(bundle, config, keys)`` and what a datalist it is given holds
    (read during the run: a datalist the command makes is gone afterwards)."""
    from meddiff3d.data.datalist import read_datalist
    from meddiff3d.utils.io import save_json

    calls = []

    def fake(root, config, keys, prepare=None):
        datalist = keys.get("datalist") or keys.get("inputs")
        held = read_datalist(datalist) if isinstance(datalist, str) and datalist.endswith(".json") else None
        calls.append(SimpleNamespace(root=root, config=config, keys=dict(keys), datalist=held, prepare=prepare))
        if config != "calibrate.yaml":
            return []
        summary = {}
        for role, key in (("detector", "calibration_path"), ("baseline", "baseline_calibration_path")):
            # what calibrate_anomaly writes: the healthy volumes' datalist and section as the config had them, or
            # the calibration_source given instead (with no section)
            source = keys.get("calibration_source")
            save_json({"healthy": {"datalist": source or keys["datalist"],
                                   "section": None if source else keys.get("calibration_section"), "ids": ["x"]}},
                      keys[key])
            summary[role] = {"calibration": keys[key], "method": "m", "volumes": 1, "threshold": 1.0,
                             "volume_threshold": 1.0}
        return summary

    for module in ("generate", "segment", "detect", "calibrate"):
        monkeypatch.setattr(f"meddiff3d.tasks.{module}.run_bundle", fake)
    return calls


def test_segment_inputs_become_a_datalist(probe, capsys, here, brats):
    assert cli(capsys, "segment", "-i", brats.cases / brats.ids[0]).code == 0  # one case folder
    assert cli(capsys, "segment", "-i", brats.cases, "-o", "out", "--num-samples", "1").code == 0  # a folder of them
    assert cli(capsys, "segment", "-i", brats.datalist, "--section", "test", "--steps", "2").code == 0
    assert cli(capsys, "segment", "-i", brats.datalist).code == 0
    one, folder, listed, every = probe
    assert one.root == SEG and one.config == "inference.yaml" and one.keys["section"] == "test"
    assert [it["id"] for it in one.datalist["test"]] == brats.ids[:1]
    assert [Path(p).name for p in one.datalist["test"][0]["image"]] == [
        f"{brats.ids[0]}_{seq}.nii.gz" for seq in ("t1", "t1ce", "t2", "flair")]
    assert one.keys["output_dir"] == str(here / "outputs" / "segmentation")
    assert [it["id"] for it in folder.datalist["test"]] == brats.ids
    assert folder.keys["output_dir"] == str(here / "out") and folder.keys["num_samples"] == 1
    assert listed.keys == {"datalist": str(brats.datalist), "section": "test", "steps": 2,
                           "output_dir": str(here / "outputs" / "segmentation")}
    assert "section" not in every.keys  # the config's default: every section that has items
    assert not (here / "outputs").exists()


def test_detect_inputs_become_image_files_or_the_datalist(probe, capsys, here, t1, fast_calibration):
    assert cli(capsys, "detect", "-i", t1.files[0], "--calibration", fast_calibration).code == 0
    assert cli(capsys, "detect", "-i", t1.folder).code == 0
    assert cli(capsys, "detect", "-i", t1.datalist, "--section", "validation", "-o", "x").code == 0
    file, folder, listed = probe
    assert file.root == ANOMALY and file.keys["inputs"] == [str(t1.files[0])]
    assert file.keys["calibration_path"] == str(fast_calibration)
    assert file.keys["output_dir"] == str(here / "outputs" / "anomaly")
    assert folder.keys["inputs"] == [str(f) for f in t1.files] and "calibration_path" not in folder.keys
    assert listed.keys["inputs"] == str(t1.datalist) and listed.keys["section"] == "validation"


def test_calibrate_writes_outside_the_bundle_and_makes_a_validation_section(probe, capsys, here, t1):
    result = cli(capsys, "calibrate", "-i", t1.folder, "--steps", "2", "--start-steps", "200", "--max-volumes", "1")
    assert result.code == 0
    (call,) = probe
    assert call.config == "calibrate.yaml" and call.keys["calibration_section"] == "validation"
    assert [it["id"] for it in call.datalist["validation"]] == [f.name.removesuffix(".nii.gz") for f in t1.files]
    assert call.keys["calibration_path"] == str(here / "outputs" / "calibration" / "calibration.json")
    assert call.keys["baseline_calibration_path"] == str(here / "outputs" / "calibration" /
                                                         "calibration_autoencoder.json")
    assert call.keys["detector#steps"] == 2 and call.keys["detector#start_steps"] == [200]
    assert call.keys["calibration_max_volumes"] == 1
    assert f"--calibration {call.keys['calibration_path']}" in result.out


def test_a_dicom_series_folder_is_one_volume(probe, capsys, here, dicom):
    """-i a folder holding one series' slices: that one volume, named after the folder (not each slice a volume); a
    folder of series sub-folders: each sub-folder a volume."""
    assert cli(capsys, "detect", "-i", dicom.series).code == 0
    assert cli(capsys, "detect", "-i", dicom.parent).code == 0
    assert cli(capsys, "calibrate", "-i", dicom.series).code == 0  # a 1-volume calibration, as a 1-file folder
    series, parent, calibration = probe
    assert series.keys["inputs"] == [str(dicom.series)]
    assert parent.keys["inputs"] == [str(dicom.parent / "a"), str(dicom.parent / "b")]
    (item,) = calibration.datalist["validation"]
    assert item["id"] == "sub-dicom" and Path(item["image"]).name == "sub-dicom"


def test_calibrate_records_the_input_it_was_given(probe, capsys, here, t1):
    """A folder -i: the calibration files name the folder as their healthy datalist, not the temporary datalist made
    of it (which is gone); a datalist -i: the datalist and its section, as the bundle wrote them."""
    assert cli(capsys, "calibrate", "-i", t1.folder).code == 0
    assert cli(capsys, "calibrate", "-i", t1.datalist, "-o", "listed.json").code == 0
    for name in ("calibration.json", "calibration_autoencoder.json"):
        healthy = json.loads((here / "outputs" / "calibration" / name).read_text())["healthy"]
        assert healthy == {"datalist": str(t1.folder), "section": None, "ids": ["x"]}
    for name in ("listed.json", "listed_autoencoder.json"):
        healthy = json.loads((here / name).read_text())["healthy"]
        assert healthy["datalist"] == str(t1.datalist) and "section" in healthy


def test_generate_covariates_given_replace_only_their_names(probe, capsys, here):
    from monai.bundle import ConfigParser

    assert cli(capsys, "generate", "--covariates", "age=0.7,sex=0", "--num-samples", "2", "--seed", "3").code == 0
    assert cli(capsys, "generate", "--covariates", "none").code == 0
    partial, unconditional = probe
    assert partial.keys == {"num_samples": 2, "seed": 3, "output_dir": str(here / "outputs" / "generation")}
    parser = ConfigParser()
    parser.read_config(str(LDM / "configs" / "inference.yaml"))
    partial.prepare(parser)
    assert parser["covariates"] == {"sex": 0.0, "age": 0.7, "ventricular_volume": 0.3, "brain_volume": 0.6}
    unconditional.prepare(parser)
    assert parser["covariates"] is None


# ------------------------------------------------------------------------------------------------ end to end
def test_segment_a_folder_of_cases_a_case_and_a_datalist(capsys, here, brats):
    before = tree(SEG)
    small = ["--num-samples", "1", "--steps", "2", *FAST]
    folder = cli(capsys, "segment", "-i", brats.cases, *small)
    assert folder.code == 0, folder.err[-2000:]
    for case in brats.ids:
        written = here / "outputs" / "segmentation" / case
        assert sorted(p.name for p in written.iterdir()) == sorted(f"{case}_{name}" for name in SEG_FILES)
        seg = nib.load(written / f"{case}_seg.nii.gz")
        source = nib.load(brats.cases / case / f"{case}_t1.nii.gz")
        assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)  # the case's own grid
    assert f"{len(brats.ids)} case(s) segmented" in folder.out
    one = cli(capsys, "segment", "-i", brats.cases / brats.ids[1], "-o", "one", *small)
    assert one.code == 0 and sorted(p.name for p in (here / "one").iterdir()) == [brats.ids[1]]
    listed = cli(capsys, "segment", "-i", brats.datalist, "--section", "test", "-o", "listed", *small)
    test_ids = [it["id"] for it in json.loads(brats.datalist.read_text())["test"]]
    assert listed.code == 0 and sorted(p.name for p in (here / "listed").iterdir()) == test_ids
    assert tree(SEG) == before  # nothing written into the bundle


def test_generate_one_sample(capsys, here):
    result = cli(capsys, "generate", "--covariates", "age=0.9", "--num-samples", "1", "--steps", "2", "--seed", "4",
                 *FAST)
    assert result.code == 0, result.err[-2000:]
    out = here / "outputs" / "generation"
    assert sorted(p.name for p in out.iterdir()) == ["sample_seed4.json", "sample_seed4.nii.gz", "sample_seed4.png"]
    side = json.loads((out / "sample_seed4.json").read_text())
    assert side["steps"] == 2 and side["covariates"]["age"] == 0.9 and side["covariates"]["sex"] == 1.0
    assert str(out / "sample_seed4.nii.gz") in result.out


def test_detect_a_folder_of_t1_files(capsys, here, t1, tmp_path_factory, fast_calibration):
    folder = tmp_path_factory.mktemp("one_t1")
    shutil.copy(t1.files[0], folder / t1.files[0].name)
    result = cli(capsys, "detect", "-i", folder, "--calibration", fast_calibration, *FAST)
    assert result.code == 0, result.err[-2000:]
    case = t1.files[0].name.removesuffix(".nii.gz")
    out = here / "outputs" / "anomaly"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{case}_{n}" for n in ANOMALY_FILES), "summary.json"])
    assert nib.load(out / f"{case}_mask.nii.gz").shape == nib.load(t1.files[0]).shape  # the input's grid
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"] == str(fast_calibration) and [c["id"] for c in summary["cases"]] == [case]
    assert "1 case(s)" in result.out


def test_detect_refuses_an_unstripped_head_before_anything_is_written(capsys, here, fast_calibration):
    """The input contract (meddiff3d.data.brain_mask): a T1 head with skull and scalp is refused with one error
    line naming the file, exit status 2, no output folder."""
    from meddiff3d.data.synthetic import healthy_subject, load_anatomy
    from meddiff3d.utils.io import save_nifti

    anatomy = load_anatomy("procedural", (32, 48, 32))
    head = save_nifti(healthy_subject(anatomy, 0, 0, skull_strip=False).images["t1"], anatomy.grid.affine,
                      here / "head_t1.nii.gz")
    result = cli(capsys, "detect", "-i", head, "--calibration", fast_calibration, *FAST)
    assert result.code == 2 and len(result.errors) == 1, result.err[-2000:]
    assert str(head) in result.errors[0] and "tissue outside the brain" in result.errors[0]
    assert not (here / "outputs").exists()


@pytest.mark.slow
def test_detect_a_dicom_series_folder(capsys, here, dicom, fast_calibration):
    result = cli(capsys, "detect", "-i", dicom.series, "--calibration", fast_calibration, *FAST)
    assert result.code == 0, result.err[-2000:]
    out = here / "outputs" / "anomaly"
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"sub-dicom_{n}" for n in ANOMALY_FILES),
                                                            "summary.json"])
    assert nib.load(out / "sub-dicom_mask.nii.gz").shape == dicom.shape  # the series' grid
    assert "1 case(s)" in result.out


@pytest.mark.slow
def test_detect_a_file_and_a_datalist(capsys, here, t1, fast_calibration):
    file = cli(capsys, "detect", "-i", t1.files[1], "--calibration", fast_calibration, "-o", "file", *FAST)
    assert file.code == 0, file.err[-2000:]
    assert (here / "file" / f"{t1.files[1].name.removesuffix('.nii.gz')}_mask.nii.gz").is_file()
    listed = cli(capsys, "detect", "-i", t1.datalist, "--section", "validation", "--calibration", fast_calibration,
                 "-o", "listed", *FAST)
    assert listed.code == 0, listed.err[-2000:]
    (case,) = json.loads((here / "listed" / "summary.json").read_text())["cases"]
    assert case["id"] == json.loads(t1.datalist.read_text())["validation"][0]["id"]


@pytest.mark.slow
def test_calibrate_a_healthy_folder_then_detect_with_it(capsys, here, t1, tmp_path_factory):
    before = tree(ANOMALY)
    folder = tmp_path_factory.mktemp("healthy_one")
    shutil.copy(t1.files[0], folder / t1.files[0].name)
    result = cli(capsys, "calibrate", "-i", folder, "--start-steps", "200", "--steps", "2", "--resample", "1", *FAST)
    assert result.code == 0, result.err[-2000:]
    out = here / "outputs" / "calibration"
    assert sorted(p.name for p in out.iterdir()) == ["calibration.json", "calibration_autoencoder.json"]
    cal = json.loads((out / "calibration.json").read_text())
    assert cal["settings"]["start_steps"] == [200] and cal["healthy"]["ids"] == [folder.iterdir().__next__().name
                                                                                   .removesuffix(".nii.gz")]
    assert cal["healthy"]["datalist"] == str(folder)  # -i as given, not the temporary datalist made of it
    assert tree(ANOMALY) == before  # never the bundle's models/calibration.json
    detect = cli(capsys, "detect", "-i", t1.files[1], "--calibration", out / "calibration.json", *FAST)
    assert detect.code == 0, detect.err[-2000:]


# ------------------------------------------------------------------------------------------------ bad inputs
def _incomplete_case(root: Path, brats) -> Path:
    case = root / "incomplete"
    case.mkdir()
    shutil.copy(brats.cases / brats.ids[0] / f"{brats.ids[0]}_t1.nii.gz", case)
    return case


def _constant_case(root: Path, brats) -> Path:
    case = root / "constant" / brats.ids[0]
    shutil.copytree(brats.cases / brats.ids[0], case)
    img = nib.load(case / f"{brats.ids[0]}_t1.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), case / f"{brats.ids[0]}_t1.nii.gz")
    return case.parent


BAD = {
    "segment without -i": (["segment"], "the following arguments are required: -i/--input"),
    "segment, an empty folder": (["segment", "-i", "{empty}"], "no BraTS files found"),
    "segment, a missing input": (["segment", "-i", "{here}/nothing"], "-i {here}/nothing: no such file or folder"),
    "segment, a case missing sequences": (["segment", "-i", "{incomplete}"], "is missing t1ce, t2, flair"),
    "segment, --section with a folder": (["segment", "-i", "{cases}", "--section", "test"], "--section picks"),
    "segment, an unknown bundle": (["segment", "-i", "{cases}", "--bundle", "{here}/no_bundle"],
                                   "--bundle {here}/no_bundle: no such bundle folder"),
    "segment, a folder that is no bundle": (["segment", "-i", "{cases}", "--bundle", "{empty}"],
                                            "has no configs/inference.yaml"),
    "detect, the generation bundle": (["detect", "-i", "{t1_file}", "--bundle", str(LDM)],
                                      "is a generation bundle; meddiff3d detect runs an anomaly bundle"),
    "detect without -i": (["detect"], "the following arguments are required: -i/--input"),
    "detect, an empty folder": (["detect", "-i", "{empty}"], "no NIfTI/NRRD files or DICOM series folders found"),
    "detect, a missing calibration": (["detect", "-i", "{t1_file}", "--calibration", "{here}/c.json"],
                                      "--calibration {here}/c.json: no such file or folder"),
    "calibrate, an empty folder": (["calibrate", "-i", "{empty}"], "no NIfTI/NRRD files or DICOM series folders"),
    "detect, two DICOM series in one folder": (["detect", "-i", "{two_series}"],
                                               "{two_series}: holds the slices of 2 DICOM series"),
    "detect, DICOM slices beside a NIfTI file": (["detect", "-i", "{beside_nifti}"],
                                                 "{beside_nifti}: holds DICOM slices beside image files"),
    "detect, a .dcm file that is no DICOM": (["detect", "-i", "{not_dicom}"],
                                             "{not_dicom}: 1 .dcm file(s) (notes.dcm) that form no DICOM series"),
    "calibrate, two DICOM series in one folder": (["calibrate", "-i", "{two_series}"],
                                                  "{two_series}: holds the slices of 2 DICOM series"),
    "calibrate, -o not a JSON": (["calibrate", "-i", "{t1_folder}", "-o", "{here}/cal.txt"], "-o {here}/cal.txt"),
    "generate, a covariate outside [0, 1]": (["generate", "--covariates", "age=2"], "age=2 is outside [0, 1]"),
    "generate, an unknown covariate": (["generate", "--covariates", "iq=0.5"], "unknown covariate(s) ['iq']"),
    "generate, zero steps": (["generate", "--steps", "0"], "steps must be an integer >= 1, got 0"),
    "segment, an empty datalist section": (["segment", "-i", "{datalist}", "--section", "validation"],
                                           "section 'validation' must be a non-empty list"),
    "segment, a constant image (named by -i)": (["segment", "-i", "{constant}"], "made from -i {constant}"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_inputs_exit_2_with_one_error_line_and_write_nothing(case, capsys, here, brats, t1, dicom):
    argv, message = BAD[case]
    (here / "empty").mkdir()
    names = {"here": here, "empty": here / "empty", "cases": brats.cases, "datalist": brats.datalist,
             "t1_file": t1.files[0], "t1_folder": t1.folder, "incomplete": None, "constant": None,
             "two_series": dicom.two_series, "beside_nifti": dicom.beside_nifti, "not_dicom": dicom.not_dicom}
    if "{incomplete}" in argv:
        names["incomplete"] = _incomplete_case(here, brats)
    if "{constant}" in argv:
        names["constant"] = _constant_case(here, brats)
    before = tree(here)
    result = cli(capsys, *(a.format(**names) for a in argv))
    assert result.code == 2, result.err[-2000:]
    assert len(result.errors) == 1 and "Traceback" not in result.err, result.err[-2000:]
    assert message.format(**names) in result.errors[0]
    assert "meddiff3d-" not in result.errors[0]  # never a scratch file's name
    assert tree(here) == before  # no ./outputs, nothing else
