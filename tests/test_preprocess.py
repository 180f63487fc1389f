"""BraTS / T1-cohort conversion, N4, and the ``meddiff3d datalist`` command."""

import json

import numpy as np
import pytest
from scipy import ndimage

from meddiff3d import cli
from meddiff3d.data.datalist import load_datalist
from meddiff3d.data.images import array_to_sitk, read_image
from meddiff3d.data.datalist import split_ids
from meddiff3d.data.preprocess import brats_to_datalist
from meddiff3d.data.t1_conversion import n4_bias_correct, t1_cohort_to_dataset
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_nifti

SHAPE = (16, 20, 18)
NAMING = {
    "brats2021": ("BraTS2021_{:05d}", "_", ("t1", "t1ce", "t2", "flair", "seg")),
    "brats2023": ("BraTS-GLI-{:05d}-000", "-", ("t1n", "t1c", "t2w", "t2f", "seg")),
}


def fake_brats(root, convention, n=5, drop=None):
    pattern, sep, suffixes = NAMING[convention]
    rng = np.random.default_rng(0)
    for i in range(n):
        case = pattern.format(i)
        for suffix in suffixes:
            if drop == (i, suffix):
                continue
            if suffix == "seg":
                data, dtype = np.zeros(SHAPE), np.uint8
            else:
                data, dtype = rng.random(SHAPE), np.float32
            save_nifti(data, np.eye(4), root / case / f"{case}{sep}{suffix}.nii.gz", dtype=dtype)
    return root


def _structure(path):
    doc = json.loads(path.read_text())
    sections = {name: len(doc[name]) for name in ("training", "validation", "test") if name in doc}
    item = doc["training"][0]
    return sections, sorted(item), doc["modalities"], sorted(doc["labels"].values())


def test_brats_2021_and_2023_give_the_same_structure(tmp_path):
    fractions = (0.6, 0.2, 0.2)
    out21 = brats_to_datalist(fake_brats(tmp_path / "b21", "brats2021"), tmp_path / "d21.json", fractions=fractions)
    out23 = brats_to_datalist(fake_brats(tmp_path / "b23", "brats2023"), tmp_path / "d23.json", fractions=fractions)
    s21, s23 = _structure(out21), _structure(out23)
    assert s21[:3] == s23[:3] == ({"training": 3, "validation": 1, "test": 1}, ["id", "image", "label"],
                                  ["t1", "t1ce", "t2", "flair"])
    assert json.loads(out21.read_text())["label_convention"] == "brats2021"
    assert json.loads(out23.read_text())["label_convention"] == "brats2023"
    items = load_datalist(out23, require_label=True)
    assert [p.rsplit("-", 1)[1] for p in items[0]["image"]] == ["t1n.nii.gz", "t1c.nii.gz", "t2w.nii.gz", "t2f.nii.gz"]
    assert items[0]["convention"] == "brats2023"
    # same seed, same ids -> same split
    ids21 = [it["id"][-5:] for it in load_datalist(out21)]
    assert ids21 == [it["id"].split("-")[2] for it in items]


def test_brats_missing_sequence_is_an_error_or_skipped(tmp_path, caplog):
    src = fake_brats(tmp_path / "b", "brats2021", n=3, drop=(1, "flair"))
    with pytest.raises(InputError, match="case BraTS2021_00001 is missing flair"):
        brats_to_datalist(src, tmp_path / "d.json")
    assert not (tmp_path / "d.json").exists()
    out = brats_to_datalist(src, tmp_path / "d.json", fractions=(1.0, 0.0, 0.0), skip_incomplete=True)
    assert sorted(it["id"] for it in load_datalist(out)) == ["BraTS2021_00000", "BraTS2021_00002"]
    assert "missing flair" in caplog.text


def test_split_is_seeded_and_complete():
    ids = [f"c{i}" for i in range(10)]
    a, b = split_ids(ids, (0.7, 0.2, 0.1), seed=3), split_ids(list(reversed(ids)), (0.7, 0.2, 0.1), seed=3)
    assert a == b and sorted(sum(a.values(), [])) == sorted(ids)
    assert [len(v) for v in a.values()] == [7, 2, 1]
    with pytest.raises(InputError, match="summing to 1"):
        split_ids(ids, (0.5, 0.2, 0.2))
    with pytest.raises(InputError, match="seed must be an integer >= 0, got -1"):
        split_ids(ids, seed=-1)


def head_phantom(shape=(20, 24, 22), center=(7.0, 13.0, 12.0), radius=5.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return (np.linalg.norm(grid - np.asarray(center), axis=-1) < radius).astype(np.float32) * 100


def test_t1_cohort_conversion(tmp_path):
    from test_datalist_readers import write_dicom_series

    src = tmp_path / "cohort"
    lps = np.diag([-1.2, -1.0, 1.1, 1.0])
    lps[:3, 3] = [10, 20, -30]
    head = head_phantom()
    save_nifti(head, lps, src / "sub-01.nii.gz")
    write_dicom_series(head.astype(np.int16), lps, src / "sub-02")
    (tmp_path / "cov.csv").write_text("id,age,sex\nsub-01,40,F\nsub-02,80,M\nsub-99,60,F\n")
    out = t1_cohort_to_dataset(src, tmp_path / "ds", covariates_csv=tmp_path / "cov.csv", shape=(16, 16, 16),
                               fractions=(1.0, 0.0, 0.0))
    doc = json.loads(out.read_text())
    assert doc["covariates"] == {"age": {"min": 40.0, "max": 80.0}, "sex": {"categories": ["F", "M"]}}
    items = {it["id"]: it for it in load_datalist(out)}
    assert items["sub-01"]["covariates"] == {"age": 0.0, "sex": 0.0}
    assert items["sub-02"]["covariates"] == {"age": 1.0, "sex": 1.0}
    for case in ("sub-01", "sub-02"):
        array, affine = read_image(items[case]["image"])
        assert array.shape == (16, 16, 16)
        np.testing.assert_allclose(affine[:3, :3], np.eye(3), atol=1e-4)  # 1 mm RAS
        # the head sits in the middle of the crop, at its original world position
        com = np.asarray(ndimage.center_of_mass(array > 50))
        np.testing.assert_allclose(com, 7.5, atol=1.0)
        expected = (lps @ np.append(ndimage.center_of_mass(head > 50), 1))[:3]
        np.testing.assert_allclose((affine @ np.append(com, 1))[:3], expected, atol=1.0)


def test_t1_cohort_covariates_csv_missing_row(tmp_path):
    src = tmp_path / "cohort"
    save_nifti(head_phantom(), np.eye(4), src / "sub-01.nii.gz")
    (tmp_path / "cov.csv").write_text("id,age\nsub-02,40\n")
    with pytest.raises(InputError, match="cov.csv: no row for id\\(s\\) \\['sub-01'\\]"):
        t1_cohort_to_dataset(src, tmp_path / "ds", covariates_csv=tmp_path / "cov.csv")
    assert not (tmp_path / "ds").exists()


def test_n4_reduces_multiplicative_bias():
    shape = (32, 32, 32)
    phantom = head_phantom(shape, center=(15.5, 15.5, 15.5), radius=12.0)
    x = np.linspace(-1, 1, shape[0])[:, None, None]
    biased = (phantom * (1.0 + 0.4 * x)).astype(np.float32)  # a smooth multiplicative field, +-40 %
    inside = ndimage.binary_erosion(phantom > 0, iterations=2)

    def cv(a):
        return float(a[inside].std() / a[inside].mean())

    image = array_to_sitk(biased, np.eye(4))
    import SimpleITK as sitk

    corrected = sitk.GetArrayFromImage(n4_bias_correct(image, shrink_factor=2, iterations=(20, 20))).transpose(2, 1, 0)
    assert cv(biased) > 0.1
    assert cv(corrected) < 0.5 * cv(biased)


def test_cli_validate_and_brats(tmp_path, monkeypatch, capsys):
    # only the datalist sub-command: the synthetic one is developed in parallel
    monkeypatch.setattr(cli, "SUBCOMMANDS", {"datalist": cli.SUBCOMMANDS["datalist"]})
    src = fake_brats(tmp_path / "b", "brats2023", n=4)
    assert cli.main(["datalist", "brats", str(src), "--out", str(tmp_path / "d.json")]) == 0
    assert cli.main(["datalist", "validate", str(tmp_path / "d.json"), "--section", "training"]) == 0
    out = capsys.readouterr().out
    assert "training: 3 items, 3 with label" in out and "label_convention: brats2023" in out
    (src / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000-t2w.nii.gz").write_bytes(b"\x1f\x8b broken")
    assert cli.main(["datalist", "validate", str(tmp_path / "d.json")]) == 2
    err = capsys.readouterr().err
    assert "meddiff3d datalist: error: datalist" in err and "BraTS-GLI-00000-000-t2w.nii.gz" in err


def test_covariates_csv_fixed_ranges(tmp_path):
    from meddiff3d.data.t1_conversion import read_covariates_csv

    csv_path = tmp_path / "cov.csv"
    csv_path.write_text("id,age,sex\na,50,F\nb,70,M\n")
    scaling, values = read_covariates_csv(csv_path, ["a", "b"])
    assert values["a"]["age"] == 0.0 and values["b"]["age"] == 1.0  # cohort min/max
    fixed = {"age": {"min": 40, "max": 90, "unit": "years"}, "sex": {"categories": ["F", "M"]}}
    scaling, values = read_covariates_csv(csv_path, ["a", "b"], fixed)
    assert values["a"]["age"] == pytest.approx(0.2) and values["b"]["age"] == pytest.approx(0.6)
    assert scaling["age"] == {"min": 40, "max": 90, "unit": "years"}
    assert values["b"]["sex"] == 1.0
    with pytest.raises(InputError, match=r"cov.csv.*'age'.*outside the fixed range \[60, 90\].*'a'"):
        read_covariates_csv(csv_path, ["a", "b"], {"age": {"min": 60, "max": 90}})
    with pytest.raises(InputError, match=r"'sex'.*\['M'\] outside the categories"):
        read_covariates_csv(csv_path, ["a", "b"], {"sex": {"categories": ["F", "X"]}})


# ------------------------------------------------------------------------------------------------ hostile input
def _datalist_cli(capsys, *argv):
    """``(exit status, stderr)`` of ``meddiff3d datalist ARGV``; stderr holds no traceback."""
    code = cli.main(["datalist", *map(str, argv)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _t1_cohort(src, names=("sub-01", "sub-02")):
    for name in names:
        save_nifti(head_phantom(), np.eye(4), src / f"{name}.nii.gz")
    return src


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_t1_truncated_input_is_an_error_and_leaves_no_output(tmp_path, capsys):
    src = _t1_cohort(tmp_path / "cohort", ("sub-01", "sub-02", "sub-03"))
    _truncate(src / "sub-02.nii.gz")
    code, err = _datalist_cli(capsys, "t1", src, "--out", tmp_path / "ds", "--shape", 16, 16, 16)
    assert code == 2 and err.count("error:") == 1
    assert "sub-02.nii.gz" in err and "truncated" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]  # no output folder, no temporary folder


def test_t1_every_unusable_input_reported(tmp_path, capsys):
    src = _t1_cohort(tmp_path / "cohort")
    (src / "loop-a.nii.gz").symlink_to("loop-b.nii.gz")
    (src / "loop-b.nii.gz").symlink_to("loop-a.nii.gz")
    save_nifti(head_phantom(), np.eye(4), src / "bad\nname.nii.gz")
    code, err = _datalist_cli(capsys, "t1", src, "--out", tmp_path / "ds")
    assert code == 2 and "3 problems" in err
    assert err.count("broken symbolic link or symlink loop") == 2 and "loop-a.nii.gz" in err
    assert "T1 case id" in err and "'bad\\nname' is not a safe file name" in err
    assert not (tmp_path / "ds").exists()
    for name in ("loop-a", "loop-b", "bad\nname"):
        (src / f"{name}.nii.gz").unlink()
    save_nifti(np.zeros((20, 24, 22)), np.eye(4), src / "sub-03.nii.gz")
    save_nifti(head_phantom(), np.diag([0.01, 0.01, 0.01, 1]), src / "sub-04.nii.gz")
    code, err = _datalist_cli(capsys, "t1", src, "--out", tmp_path / "ds")
    assert code == 2 and "2 problems" in err and "sub-03.nii.gz: all voxels are 0" in err
    assert "sub-04.nii.gz: voxel spacing (0.01, 0.01, 0.01) mm is outside the plausible range" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_t1_output_folder_and_sizes_checked_first(tmp_path, capsys):
    src = _t1_cohort(tmp_path / "cohort")
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    for argv, message in [
        (["--out", tmp_path / "file"], "is an existing file, not a folder"),
        (["--out", tmp_path / "file" / "ds"], "which is an existing file"),
        (["--out", tmp_path / "full"], "already exists and is not empty"),
        (["--out", tmp_path / "ds", "--shape", 10000, 10000, 10000], "1e+12 voxels; at most 134217728"),
        (["--out", tmp_path / "ds", "--spacing", 0.001, 1, 1], "--spacing (mm) must be a finite number in [0.1, 10]"),
        (["--out", tmp_path / "ds", "--n4-shrink", 0], "--n4-shrink must be an integer >= 1"),
    ]:
        code, err = _datalist_cli(capsys, "t1", src, *argv)
        assert code == 2 and message in err, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "file", "full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_t1_memory_limit_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDDIFF3D_MAX_MEMORY_GB", "0.0001")  # 100 kB: less than one 20x24x22 input
    code, err = _datalist_cli(capsys, "t1", _t1_cohort(tmp_path / "cohort"), "--out", tmp_path / "ds")
    assert code == 2 and "converting T1" in err and "MEDDIFF3D_MAX_MEMORY_GB=0.0001 allows" in err
    assert not (tmp_path / "ds").exists()


def test_t1_conversion_into_an_empty_folder(tmp_path):
    (tmp_path / "ds").mkdir()
    out = t1_cohort_to_dataset(_t1_cohort(tmp_path / "cohort"), tmp_path / "ds", shape=(16, 16, 16),
                               fractions=(1.0, 0.0, 0.0))
    assert out == tmp_path / "ds" / "datalist.json"
    assert sorted(p.name for p in (tmp_path / "ds" / "images").iterdir()) == ["sub-01_t1.nii.gz", "sub-02_t1.nii.gz"]
    assert len(load_datalist(out)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["cohort", "ds"]


def test_covariates_csv_byte_order_mark_and_duplicate_ids(tmp_path):
    from meddiff3d.data.t1_conversion import read_covariates_csv

    csv_path = tmp_path / "cov.csv"
    csv_path.write_bytes("id,age\na,50\nb,70\n".encode("utf-8-sig"))  # as spreadsheets save it
    assert read_covariates_csv(csv_path, ["a", "b"])[1]["b"] == {"age": 1.0}
    csv_path.write_text("id,age\na,50\na,70\n")
    with pytest.raises(InputError, match="id 'a' appears twice"):
        read_covariates_csv(csv_path, ["a"])
    csv_path.write_bytes(b"id,age\n\xff\xfe,1\n")
    with pytest.raises(InputError, match="cannot read it as UTF-8 CSV"):
        read_covariates_csv(csv_path, ["a"])
    csv_path.write_text("id,age\na,50\n")
    with pytest.raises(InputError, match="'age' min"):
        read_covariates_csv(csv_path, ["a"], {"age": {"min": "old", "max": 90}})


def test_validate_reports_every_section_and_accepts_an_empty_one(tmp_path, capsys):
    src = fake_brats(tmp_path / "b", "brats2021", n=3)
    out = brats_to_datalist(src, tmp_path / "d.json", fractions=(1.0, 0.0, 0.0))
    doc = json.loads(out.read_text())
    doc["test"], doc["training"] = doc["training"], []
    out.write_text(json.dumps(doc))
    assert cli.main(["datalist", "validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training: empty" in printed and "test: 3 items, 3 with label" in printed
    doc["training"] = [dict(doc["test"][0], id="../../escape")]
    doc["validation"] = [dict(doc["test"][1], id="/abs/id"), dict(doc["test"][1], image=["nope.nii.gz"] * 4)]
    out.write_text(json.dumps(doc))
    code, err = _datalist_cli(capsys, "validate", out)
    assert code == 2 and err.count("error:") == 1 and "6 problems" in err  # 2 ids, 4 missing files
    assert "training[0]: item id '../../escape' is not a safe file name" in err
    assert "validation[0]: item id '/abs/id' is not a safe file name" in err and "image file not found" in err
    code, err = _datalist_cli(capsys, "validate", out, "--content", "--header-only")
    assert code == 2 and "--content reads every voxel" in err


def test_brats_reads_every_voxel_follows_links_and_reports_bad_entries(tmp_path, capsys):
    src = fake_brats(tmp_path / "b", "brats2021", n=3)
    (tmp_path / "elsewhere").mkdir()
    (src / "BraTS2021_00002").rename(tmp_path / "elsewhere" / "BraTS2021_00002")
    (src / "BraTS2021_00002").symlink_to(tmp_path / "elsewhere" / "BraTS2021_00002")  # a linked case folder counts
    out = brats_to_datalist(src, tmp_path / "d.json", fractions=(1.0, 0.0, 0.0))
    assert sorted(it["id"] for it in load_datalist(out)) == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    _truncate(src / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz")
    code, err = _datalist_cli(capsys, "brats", src, "--out", tmp_path / "d2.json")
    assert code == 2 and "BraTS2021_00001_t2.nii.gz" in err and "truncated" in err
    assert f"datalist {tmp_path / 'd2.json'}: " in err  # the datalist asked for, not a staging file
    assert not (tmp_path / "d2.json").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b", "d.json",
                                                                                                 "elsewhere"]
    assert _datalist_cli(capsys, "brats", src, "--out", tmp_path / "d2.json", "--header-only")[0] == 0
    (src / "BraTS2021_00000" / "BraTS2021_00000_seg2.nii.gz").symlink_to("nowhere.nii.gz")
    save_nifti(np.ones(SHAPE), np.eye(4), src / "BraTS2021_00000" / "x..y_t1.nii.gz")
    code, err = _datalist_cli(capsys, "brats", src, "--out", tmp_path / "d3.json")
    assert code == 2 and "2 problems" in err and "seg2.nii.gz: broken symbolic link" in err
    assert "BraTS case id" in err and "'x..y' is not a safe file name" in err
    assert not (tmp_path / "d3.json").exists()
    code, err = _datalist_cli(capsys, "brats", src, "--out", tmp_path)
    assert code == 2 and "is a folder; give the datalist JSON file" in err
