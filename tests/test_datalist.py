"""load_datalist: every validation error names the datalist file, the item and the problem."""

import json

import numpy as np
import pytest

from meddiff3d.data.datalist import load_datalist, write_datalist
from meddiff3d.errors import DatalistError
from meddiff3d.utils.io import save_nifti

SHAPE = (16, 20, 18)
AFFINE = np.diag([1.0, 1.2, 1.5, 1.0])


def _image(path, shape=SHAPE, affine=AFFINE, value=None, dtype=np.float32):
    data = np.random.default_rng(0).random(shape).astype(np.float32) + 1.0 if value is None else value
    return save_nifti(data, affine, path, dtype=dtype)


@pytest.fixture
def dataset(tmp_path):
    """Two 2-modality items with labels, and a writer for variants of the datalist."""
    for case in ("a", "b"):
        for mod in ("t1", "t2"):
            _image(tmp_path / "images" / f"{case}_{mod}.nii.gz")
        _image(tmp_path / "labels" / f"{case}_seg.nii.gz", value=np.zeros(SHAPE), dtype=np.uint8)

    def make(items=None, **meta):
        items = items if items is not None else [
            {"id": c, "image": [f"images/{c}_t1.nii.gz", f"images/{c}_t2.nii.gz"], "label": f"labels/{c}_seg.nii.gz",
             "covariates": {"age": 0.5}} for c in ("a", "b")
        ]
        meta = {"modalities": ["t1", "t2"], "covariates": {"age": {"min": 20, "max": 90}}, **meta}
        return write_datalist(tmp_path / "datalist.json", {"training": items}, **meta)

    return tmp_path, make


def _item(case="a", **extra):
    return {"id": case, "image": [f"images/{case}_t1.nii.gz", f"images/{case}_t2.nii.gz"], **extra}


def _raises(path, *fragments, **kwargs):
    with pytest.raises(DatalistError) as info:
        load_datalist(path, **kwargs)
    message = str(info.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_valid_datalist_returns_absolute_paths(dataset):
    root, make = dataset
    items = load_datalist(make(), require_label=True)
    assert [it["id"] for it in items] == ["a", "b"]
    assert items[0]["image"] == [str(root / "images/a_t1.nii.gz"), str(root / "images/a_t2.nii.gz")]
    assert items[0]["label"] == str(root / "labels/a_seg.nii.gz")
    assert items[0]["covariates"] == {"age": 0.5}


def test_missing_datalist(tmp_path):
    _raises(tmp_path / "nope.json", "file not found")


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    _raises(path, "not valid JSON")


def test_missing_section(dataset):
    _, make = dataset
    _raises(make(), "no section 'validation'", section="validation")


def test_empty_section(dataset):
    root, make = dataset
    path = make()
    doc = json.loads(path.read_text())
    doc["training"] = []
    path.write_text(json.dumps(doc))
    _raises(path, "'training' must be a non-empty list")


def test_missing_image_file(dataset):
    root, make = dataset
    (root / "images/b_t2.nii.gz").unlink()
    _raises(make(), "training[1] (id b)", "image file not found", "b_t2.nii.gz")


def test_missing_label_file_and_required_label(dataset):
    root, make = dataset
    (root / "labels/a_seg.nii.gz").unlink()
    _raises(make(), "(id a)", "label file not found")
    _raises(make([_item("a"), _item("b")]), "(id a)", "no 'label' (required)", require_label=True)


def test_truncated_nifti(dataset):
    root, make = dataset
    target = root / "images/a_t2.nii.gz"
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    _raises(make(), "(id a)", "a_t2.nii.gz", "truncated")


def test_not_a_nifti(dataset):
    root, make = dataset
    (root / "images/a_t1.nii.gz").write_bytes(b"garbage" * 10)
    _raises(make(), "(id a)", "a_t1.nii.gz", "unreadable")


def test_header_only_check_is_fast_path(dataset):
    root, make = dataset
    save_nifti(np.full(SHAPE, np.nan, np.float32), AFFINE, root / "images/a_t1.nii.gz")
    assert len(load_datalist(make(), check_images="header")) == 2  # NaNs only found when the voxels are read


def test_wrong_number_of_modalities(dataset):
    _, make = dataset
    items = [_item("a"), {"id": "b", "image": ["images/b_t1.nii.gz"]}]
    _raises(make(items), "training[1] (id b)", "wrong number of modalities", "expected 2")
    _raises(make([_item("a")]), "wrong number of modalities", modalities=3)


def test_modalities_of_different_shapes(dataset):
    root, make = dataset
    _image(root / "images/a_t2.nii.gz", shape=(16, 20, 17))
    _raises(make(), "(id a)", "a_t2.nii.gz", "shape (16, 20, 17) differs")


def test_modalities_of_different_affines(dataset):
    root, make = dataset
    shifted = AFFINE.copy()
    shifted[0, 3] = 0.01
    _image(root / "images/a_t2.nii.gz", affine=shifted)
    _raises(make(), "(id a)", "a_t2.nii.gz", "affine differs")
    shifted[0, 3] = 1e-4  # within tolerance
    _image(root / "images/a_t2.nii.gz", affine=shifted)
    load_datalist(make())


def test_nan_and_inf_values(dataset):
    root, make = dataset
    data = np.ones(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    data[2, 2, 3] = np.inf
    save_nifti(data, AFFINE, root / "images/b_t1.nii.gz")
    _raises(make(), "(id b)", "b_t1.nii.gz", "non-finite", "1 NaN, 1 Inf")


def test_2d_image(dataset):
    root, make = dataset
    save_nifti(np.ones((16, 20), np.float32), np.eye(4), root / "images/a_t1.nii.gz")
    _raises(make(), "(id a)", "a_t1.nii.gz", "image is 2D")


def test_4d_image_rejected_but_singleton_4th_dim_squeezed(dataset):
    root, make = dataset
    save_nifti(np.ones(SHAPE + (1,), np.float32), AFFINE, root / "images/a_t1.nii.gz")
    load_datalist(make())  # x, y, z, 1 is a 3D volume
    save_nifti(np.ones(SHAPE + (3,), np.float32), AFFINE, root / "images/a_t1.nii.gz")
    _raises(make(), "(id a)", "a_t1.nii.gz", "image is 4D")


def test_label_grid_differs_from_image(dataset):
    root, make = dataset
    _image(root / "labels/b_seg.nii.gz", shape=(16, 20, 19), dtype=np.uint8)
    _raises(make(), "(id b)", "label", "b_seg.nii.gz", "shape (16, 20, 19) differs")


def test_unknown_covariate(dataset):
    _, make = dataset
    _raises(make([_item("a", covariates={"height": 0.5})]), "(id a)", "unknown covariate 'height'")
    _raises(make([_item("a", covariates={"age": 0.5})]), "unknown covariate 'age'", covariates=["sex"])


def test_covariate_not_a_number_or_out_of_range(dataset):
    _, make = dataset
    _raises(make([_item("a", covariates={"age": "old"})]), "(id a)", "'age' = 'old' is not a number")
    _raises(make([_item("a", covariates={"age": 63})]), "(id a)", "'age' = 63 is outside [0, 1]")


def test_all_problems_listed(dataset):
    root, make = dataset
    (root / "images/a_t1.nii.gz").unlink()
    (root / "images/b_t1.nii.gz").unlink()
    message = _raises(make(), "2 problems", "(id a)", "(id b)")
    assert message.count("image file not found") == 2


def test_duplicate_ids(dataset):
    _, make = dataset
    _raises(make([_item("a"), _item("a")]), "training[1] (id a)", "duplicate id")


@pytest.mark.parametrize("unsafe", ["../x", "/abs/olute", "a/b", "..", "new\nline", "nul\x00", "", "x" * 201])
def test_unsafe_ids_rejected(dataset, unsafe):
    _, make = dataset
    message = _raises(make([_item("a"), dict(_item("b"), id=unsafe)]), "training[1]: item id",
                      "is not a safe file name")
    assert "\n" not in message  # one problem, one line: control characters are shown escaped


def test_unsafe_and_duplicate_ids_all_listed(dataset):
    _, make = dataset
    items = [dict(_item("a"), id="../a"), dict(_item("b"), id=["b"]), _item("a"), _item("a")]
    _raises(make(items), "3 problems", "training[0]: item id '../a' is not a safe file name",
                      "training[1]: item id must be a text name", "training[3] (id a): duplicate id")


def test_empty_section_names_the_sections_with_items(dataset):
    root, make = dataset
    path = make()
    doc = json.loads(path.read_text())
    doc["training"], doc["test"] = [], doc["training"]
    path.write_text(json.dumps(doc))
    _raises(path, "section 'training' must be a non-empty list of items (it is empty; sections with items: test)")
    assert [it["id"] for it in load_datalist(path, "test")] == ["a", "b"]


def test_check_datalist_reports_every_section(dataset):
    from meddiff3d.data.datalist import check_datalist

    root, make = dataset
    path = make()
    doc = json.loads(path.read_text())
    doc["validation"] = []  # empty: fine beside sections with items
    doc["test"] = [dict(doc["training"][0], id="../escape")]
    doc["training"][1]["image"] = ["images/b_t1.nii.gz", "images/gone.nii.gz"]
    path.write_text(json.dumps(doc))
    with pytest.raises(DatalistError) as info:
        check_datalist(path)
    message = str(info.value)
    assert message.startswith(f"datalist {path}: 2 problems:")
    assert "training[1] (id b): image file not found" in message and "test[0]: item id '../escape'" in message
    doc["training"][1]["image"] = ["images/b_t1.nii.gz", "images/b_t2.nii.gz"]
    doc["test"] = []
    path.write_text(json.dumps(doc))
    checked = check_datalist(path)
    assert {name: len(items) for name, items in checked.items()} == {"training": 2, "validation": 0, "test": 0}
    doc["training"] = []
    path.write_text(json.dumps(doc))
    with pytest.raises(DatalistError, match="every section checked is empty"):
        check_datalist(path)


def test_content_checks_pass_through_for_images_not_labels(dataset):
    root, make = dataset
    path = make()
    assert len(load_datalist(path, check_images=True, content=True)) == 2  # all-zero labels are fine
    save_nifti(np.zeros(SHAPE, np.float32), AFFINE, root / "images/b_t2.nii.gz")
    assert len(load_datalist(path)) == 2  # content checks are off unless asked for
    _raises(path, "(id b)", "b_t2.nii.gz", "all voxels are 0", content=True)
    with pytest.raises(ValueError, match="needs check_images=True"):
        load_datalist(path, check_images="header", content=True)
