"""Synthetic datasets on disk: NIfTI geometry (nibabel, ITK), datalist content, the `meddiff3d synth` CLI."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from meddiff3d.cli import main
from meddiff3d.data.synthetic import write_cohort

SHAPE = (32, 48, 32)


@pytest.fixture(scope="module")
def anomaly_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("anomaly")
    write_cohort("anomaly", out, n=12, seed=0, shape=SHAPE, source="procedural", progress=False)
    return out


@pytest.fixture(scope="module")
def brats_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("brats")
    write_cohort("brats", out, n=2, seed=0, shape=(40, 56, 40), source="procedural", progress=False)
    return out


def _items(doc):
    return [item for section in ("training", "validation", "test") for item in doc.get(section, [])]


def test_nifti_geometry_nibabel_and_itk(anomaly_set):
    path = anomaly_set / "images" / "sub-0000_t1.nii.gz"
    img = nib.load(path)
    assert img.shape == SHAPE
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    spacing = np.array([160 / 32, 224 / 48, 160 / 32])
    assert np.allclose(img.header.get_zooms()[:3], spacing)
    assert np.allclose(img.affine[:3, :3], np.diag(spacing))
    assert np.allclose(img.affine[:3, 3], np.array([-80.5, -128.5, -74.5]) + spacing / 2)
    assert np.allclose(img.header.get_qform(), img.header.get_sform())
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    assert np.allclose(image.GetSpacing(), spacing, atol=1e-5)
    lps_origin = img.affine[:3, 3] * np.array([-1, -1, 1])
    assert np.allclose(image.GetOrigin(), lps_origin, atol=1e-4)
    assert np.allclose(np.array(image.GetDirection()).reshape(3, 3), np.diag([-1, -1, 1]), atol=1e-6)
    import itk

    itk_image = itk.imread(str(path))
    assert np.allclose(np.array(itk_image.GetSpacing()), spacing, atol=1e-5)
    assert np.allclose(np.array(itk_image.GetOrigin()), lps_origin, atol=1e-4)


def test_subject_independent_of_n(anomaly_set, tmp_path):
    write_cohort("anomaly", tmp_path, n=4, seed=0, shape=SHAPE, source="procedural", progress=False)
    for k in range(4):
        a = nib.load(anomaly_set / "images" / f"sub-{k:04d}_t1.nii.gz").get_fdata()
        b = nib.load(tmp_path / "images" / f"sub-{k:04d}_t1.nii.gz").get_fdata()
        assert np.array_equal(a, b)


def test_anomaly_datalist(anomaly_set):
    doc = json.loads((anomaly_set / "datalist.json").read_text())
    assert doc["modalities"] == ["t1"] and set(doc["covariates"]) == {"age", "sex", "brain_volume", "ventricular_volume"}
    assert doc["training"] and doc["validation"] and doc["test"]
    for item in _items(doc):
        for p in [item["image"]] + ([item["label"]] if "label" in item else []):
            assert not Path(p).is_absolute() and (anomaly_set / p).is_file()
        assert all(0.0 <= v <= 1.0 for v in item["covariates"].values())
        raw, scaled = item["covariates_raw"]["age"], item["covariates"]["age"]
        assert abs((raw - 40) / 50 - scaled) < 1e-3
    kinds = [item["lesion_kind"] for item in doc["test"]]
    assert set(kinds) == {"tumour", "multifocal", "dark", "none"}
    for item in doc["test"]:
        mask = nib.load(anomaly_set / item["label"]).get_fdata()
        assert (mask.sum() == 0) == (item["lesion_kind"] == "none")
    assert all(item["lesion_kind"] == "none" and "label" not in item for item in doc["training"] + doc["validation"])


def test_brats_datalist(brats_set):
    doc = json.loads((brats_set / "datalist.json").read_text())
    assert doc["label_convention"] == "brats2021" and doc["labels"] == {"0": "background", "1": "NCR", "2": "ED", "4": "ET"}
    assert doc["modalities"] == ["t1", "t1ce", "t2", "flair"]
    for item in _items(doc):
        assert [Path(p).name for p in item["image"]] == [f"{item['id']}_{m}.nii.gz" for m in doc["modalities"]]
        label = nib.load(brats_set / item["label"])
        assert label.get_data_dtype() == np.uint8 and set(np.unique(label.get_fdata())) <= {0, 1, 2, 4}


def test_cli_healthy(tmp_path, capsys):
    out = tmp_path / "healthy"
    code = main(["synth", "healthy", "--n", "3", "--out", str(out), "--seed", "1", "--shape", "32", "48", "32",
                 "--source", "procedural", "--val-fraction", "0.34", "--no-progress"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("synth healthy: 3 subjects") and lines[0].endswith(" s")
    assert lines[1] == "covariates (raw units):" and lines[2].split()[0] == "age" and len(lines) == 2 + 4 + 1 + 4
    doc = json.loads((out / "datalist.json").read_text())
    assert len(_items(doc)) == 3 and doc["synthetic"]["seed"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--n", "0"], "n=0"),
    (["--n", "2", "--val-fraction", "1.5"], "validation fraction"),
    (["--n", "2", "--shape", "2", "48", "32"], "shape"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    code = main(["synth", "healthy", "--out", str(tmp_path / "x"), "--source", "procedural", *argv])
    assert code != 0
    assert message in capsys.readouterr().err


def test_cli_unknown_kind(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "zombie", "--n", "2", "--out", str(tmp_path)])
    assert exit_info.value.code != 0
    assert "invalid choice" in capsys.readouterr().err


def test_cli_huge_shape_fails_fast_writing_nothing(tmp_path, capsys):
    import time

    start = time.perf_counter()
    code = main(["synth", "brats", "--n", "2", "--out", str(tmp_path / "x"), "--shape", "10000", "10000", "10000",
                 "--source", "procedural"])
    assert code == 2 and time.perf_counter() - start < 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: synth --shape (10000, 10000, 10000) is 1e+12 voxels" in err
    assert list(tmp_path.iterdir()) == []


def test_cli_memory_limit_and_output_folder_checked_first(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDDIFF3D_MAX_MEMORY_GB", "0.001")
    code = main(["synth", "healthy", "--n", "1", "--out", str(tmp_path / "x"), "--shape", "64", "64", "64",
                 "--source", "procedural"])
    assert code == 2 and "synth --shape 64 64 64 needs about 78.6 MB of memory; the limit MEDDIFF3D_MAX_MEMORY_GB=" \
                         "0.001 allows 1.0 MB" in capsys.readouterr().err
    monkeypatch.delenv("MEDDIFF3D_MAX_MEMORY_GB")
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "x"):
        code = main(["synth", "healthy", "--n", "1", "--out", str(out), "--shape", "16", "16", "16",
                     "--source", "procedural"])
        assert code == 2 and "error: synth --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
