"""The 2D readers (meddiff3d.data.images2d) on real DICOM files (pydicom's bundled test data, decoded by pydicom as
the reference) and on PNG / NIfTI files written here, and their refusals."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meddiff3d.data.images2d import is_image_2d_file, read_image_2d
from meddiff3d.errors import ImageError

pydicom = pytest.importorskip("pydicom", reason="pydicom is part of the test extra (setup.cfg)")
from pydicom.data import get_testdata_file  # noqa: E402


def reference(name: str) -> tuple[np.ndarray, tuple[float, float]]:
    """pydicom's decoding of a test file: the rescaled pixel values and the pixel spacing (rows, columns)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    values = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1)) + float(getattr(ds, "RescaleIntercept", 0))
    return values.astype(np.float32), tuple(float(s) for s in ds.PixelSpacing)


@pytest.mark.parametrize("name, shape", [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64)),
                                         ("MR_small_RLE.dcm", (64, 64))])
def test_real_dicom_slices_read_as_pydicom_decodes_them(name, shape):
    image = read_image_2d(get_testdata_file(name))
    values, spacing = reference(name)
    assert image.shape == shape and image.format == "dicom" and image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, values)
    assert image.spacing == pytest.approx(spacing)
    if name == "CT_small.dcm":
        assert image.array.min() < -800 and image.array.max() > 1000  # Hounsfield units: the rescale applied


def test_monochrome1_radiograph_is_inverted_so_bright_is_high(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "mono1.dcm")
    normal = read_image_2d(get_testdata_file("MR_small.dcm")).array
    inverted = read_image_2d(tmp_path / "mono1.dcm").array  # GDCM's inversion: -1 - value
    assert np.ptp(inverted + normal) == 0 and np.corrcoef(inverted.ravel(), normal.ravel())[0, 1] == pytest.approx(-1)


@pytest.mark.parametrize("name, match", [
    ("rtdose.dcm", r"is a multi-frame DICOM \(15 frames\); a single 2D image is expected"),
    ("SC_rgb_small_odd.dcm", r"is a colour image \(3 channels that differ\); a grayscale image is expected"),
])
def test_multi_frame_and_colour_dicoms_are_refused_naming_the_file(name, match):
    path = get_testdata_file(name)
    with pytest.raises(ImageError, match=rf"^{path}: {match}$"):
        read_image_2d(path)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_keeps_its_values_and_display_order(tmp_path, dtype):
    array = (np.arange(12 * 20).reshape(12, 20) * (3 if dtype == np.uint8 else 250)).astype(dtype)
    array[0, 0] = np.iinfo(dtype).max  # the top-left pixel
    Image.fromarray(array).save(tmp_path / "x.png")
    image = read_image_2d(tmp_path / "x.png")
    assert image.shape == (12, 20) and image.spacing == (1.0, 1.0) and image.format == "png"
    np.testing.assert_array_equal(image.array, array.astype(np.float32))


def test_grey_saved_as_rgb_is_grey_and_colour_is_refused(tmp_path):
    grey = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb_grey.png")
    np.testing.assert_array_equal(read_image_2d(tmp_path / "rgb_grey.png").array, grey)
    colour = np.stack([grey, grey, 255 - grey, np.full_like(grey, 255)], -1)
    Image.fromarray(colour, "RGBA").save(tmp_path / "colour.png")
    with pytest.raises(ImageError, match=r"colour\.png: is a colour image \(4 channels that differ\)"):
        read_image_2d(tmp_path / "colour.png")


def test_nifti_2d_and_single_slice_volumes(tmp_path):
    """A 2D NIfTI of shape (X, Y) reads as rows Y x columns X (ITK's order); (X, Y, 1) as the same image."""
    data = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
    affine = np.diag([0.5, 0.8, 1.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "a.nii.gz")
    nib.save(nib.Nifti1Image(data[..., None], affine), tmp_path / "b.nii")
    for name in ("a.nii.gz", "b.nii"):
        image = read_image_2d(tmp_path / name)
        np.testing.assert_array_equal(image.array, data.T)
        assert image.spacing == pytest.approx((0.8, 0.5)) and image.format == "nifti"


@pytest.mark.parametrize("write, match", [
    (lambda p: nib.save(nib.Nifti1Image(np.where(np.eye(4) > 0, np.nan, 1).astype(np.float32), np.eye(4)), p / "x.nii"),
     r"has 4 non-finite \(NaN or infinite\) pixels"),
    (lambda p: Image.fromarray(np.full((8, 8), 7, np.uint8)).save(p / "x.png"), r"is constant \(every pixel 7\)"),
    (lambda p: nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)), p / "x.nii"),
     r"is a 3D image of size \[4, 4, 3\]; a single 2D image is expected"),
    (lambda p: (p / "x.png").write_bytes(b"not a png"), r"unreadable image"),
    (lambda p: (p / "x.bmp").write_bytes(b""), r"unsupported 2D image format '\.bmp'"),
])
def test_bad_files_get_one_error_naming_them(tmp_path, write, match):
    write(tmp_path)
    (path,) = tmp_path.iterdir()
    with pytest.raises(ImageError, match=rf"^{path}: {match}"):
        read_image_2d(path)
    with pytest.raises(ImageError, match=r"missing\.png: file not found"):
        read_image_2d(tmp_path / "missing.png")


def test_suffixes():
    assert all(is_image_2d_file(f"a{s}") for s in (".png", ".PNG", ".jpg", ".dcm", ".nii.gz", ".nii", ".mha"))
    assert not any(is_image_2d_file(f"a{s}") for s in (".gz", ".txt", ".bmp"))


# ------------------------------------------------------------------------------------------------ 2D datalists
def png(path, size=(16, 12), seed=0, channels=None):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size if channels is None else (*size, channels), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path.name


def test_2d_datalist_loads_and_names_each_problem(tmp_path):
    from meddiff3d.data.datalist import check_datalist, load_datalist, write_datalist
    from meddiff3d.errors import DatalistError

    good = [{"id": f"x{i}", "image": png(tmp_path / f"x{i}.png", seed=i)} for i in range(3)]
    path = write_datalist(tmp_path / "datalist.json", {"training": good}, spatial_dims=2, modalities=["xray"])
    for check_images in (True, "header"):
        items = load_datalist(path, check_images=check_images)
        assert [i["image"] for i in items] == [str(tmp_path / f"x{i}.png") for i in range(3)]

    bad = [*good, {"id": "big", "image": png(tmp_path / "big.png", size=(20, 12))},
           {"id": "rgb", "image": png(tmp_path / "rgb.png", channels=3)},
           {"id": "two", "image": [good[0]["image"], good[1]["image"]]}]
    nib.save(nib.Nifti1Image(np.ones((4, 4, 3), np.float32), np.eye(4)), tmp_path / "vol.nii.gz")
    bad.append({"id": "vol", "image": "vol.nii.gz"})
    path = write_datalist(tmp_path / "bad.json", {"training": bad}, spatial_dims=2, modalities=["xray"])
    with pytest.raises(DatalistError) as err:
        check_datalist(path)
    message = str(err.value)
    for expected in ("training[4] (id rgb): image", "is a colour image (3 channels that differ)",
                     "training[5] (id two): wrong number of modalities: 2 image(s), expected 1 ['xray']",
                     "training[6] (id vol): image", "is a 3D image of size [4, 4, 3]",
                     "images differ in size: 5 of 16 rows x 12 columns (first training[0] (id x0)), 1 of 20 rows x 12 "
                     "columns (first training[3] (id big))"):
        assert expected in message, (expected, message)
    path = write_datalist(tmp_path / "dims.json", {"training": good}, spatial_dims=4)
    with pytest.raises(DatalistError, match="'spatial_dims' must be 2 or 3, got 4"):
        load_datalist(path)


# ------------------------------------------------------------------------------------------------ slices of a 3D cohort
def test_slice_datalist_shows_axial_slices_radiologically(tmp_path, capsys):
    """A volume with a marker in the right posterior corner, stored RAS and LPS: the slices show the marker at the
    bottom left (anterior up, the patient's right on the image's left; a transposed or flipped slice would not),
    the same for both files."""
    from bundle_testing import script_module
    from meddiff3d.data.datalist import load_datalist, write_datalist

    script = script_module("make_slice_datalist")
    volume = np.zeros((20, 24, 16), np.float32)
    volume[3:17, 3:21, 2:14] = 0.5  # the brain
    volume[14:17, 4:7, 2:14] = 1.0  # right (high x), posterior (low y)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "ras.nii.gz")
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [19, 23]
    nib.save(nib.Nifti1Image(volume[::-1, ::-1].copy(), affine @ flip), tmp_path / "lps.nii.gz")
    cohort = write_datalist(tmp_path / "cohort.json", {"training": [{"id": "ras", "image": str(tmp_path / "ras.nii.gz")}],
                                                       "test": [{"id": "lps", "image": str(tmp_path / "lps.nii.gz")}]})
    assert script.main([str(cohort), "--out", str(tmp_path / "slices"), "--size", "12", "12", "--slices", "3",
                        "--no-progress"]) == 0
    doc = json.loads((tmp_path / "slices" / "datalist.json").read_text())
    assert doc["spatial_dims"] == 2 and doc["classes"] == ["inferior", "middle", "superior"]
    assert [i["class"] for i in doc["training"]] == ["inferior", "middle", "superior"]
    assert doc["pixel_spacing_mm"] == [4.0, 4.0]  # 24 voxels of 2 mm over 12 pixels
    items = load_datalist(tmp_path / "slices" / "datalist.json", "training")
    ras = [read_image_2d(i["image"]).array for i in items]
    lps = [read_image_2d(i["image"]).array for i in load_datalist(tmp_path / "slices" / "datalist.json", "test")]
    for a, b in zip(ras, lps):
        assert a.shape == (12, 12) and a.max() > 255 * 100  # 16-bit
        np.testing.assert_array_equal(a, b)
        row, column = np.unravel_index(np.argmax(a), a.shape)
        assert row >= 8 and column < 4, (row, column)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), affine), tmp_path / "empty.nii.gz")
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 2.0, 2.0, 1.0])), tmp_path / "aniso.nii.gz")
    for name, match in (("empty", "no brain found"), ("aniso", "voxels of 1 x 2 mm in the axial plane")):
        bad = write_datalist(tmp_path / f"{name}.json", {"training": [{"id": name,
                                                                       "image": str(tmp_path / f"{name}.nii.gz")}]})
        capsys.readouterr()
        assert script.main([str(bad), "--out", str(tmp_path / "none"), "--no-progress"]) == 2
        assert match in capsys.readouterr().err and not (tmp_path / "none" / "images").exists()


def test_chestxray14_folder_converts_by_patient_with_its_classes(tmp_path, capsys):
    """A small folder laid out as NIH ChestX-ray14 (PNG files, Data_Entry_2017.csv; 1024 -> 128 there, 64 -> 16 here),
    one class per image, patients never split across sections, a grey RGBA file read as grey; bad inputs: one error."""
    from bundle_testing import script_module

    script = script_module("convert_chestxray14")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
            "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"]
    findings = ["No Finding", "Effusion", "Cardiomegaly|Effusion", "No Finding", "Effusion", "Nodule"]
    for i, finding in enumerate(findings):
        name = f"0000{i:04d}_000.png"
        grey = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1) if i == 1 else grey).save(images / name)
        rows.append(f"{name},{finding},0,{i // 2 + 1},50,M,PA,2500,2000,0.143,0.150")  # the original's size
    rows.append("missing.png,No Finding,0,9,50,F,PA,64,64,0.143,0.143")  # listed but not in the folder: not used
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "cxr"
    assert script.main([str(images), str(tmp_path / "labels.csv"), "--out", str(out), "--size", "16",
                        "--findings", "Effusion", "--fractions", "0.34", "0.33", "0.33", "--no-progress"]) == 0
    doc = json.loads((out / "datalist.json").read_text())
    assert doc["spatial_dims"] == 2 and doc["classes"] == ["No Finding", "Effusion"]
    items = [i for s in ("training", "validation", "test") for i in doc[s]]
    assert sorted(i["class"] for i in items) == ["Effusion", "Effusion", "No Finding", "No Finding"]
    assert doc["source"]["skipped"] == 2  # the two-finding image and the nodule
    for section in ("training", "validation", "test"):
        for item in doc[section]:
            others = [j for s in ("training", "validation", "test") if s != section for j in doc[s]]
            assert item["patient"] not in {j["patient"] for j in others}
            image = read_image_2d(out / item["image"])
            assert image.shape == (16, 16) and image.array.min() == 0 and image.array.max() == 255
            assert item["pixel_spacing_mm"] == pytest.approx([0.150 * 2000 / 16, 0.143 * 2500 / 16])
    assert script.main([str(images), str(tmp_path / "labels.csv"), "--out", str(tmp_path / "all"), "--size", "16",
                        "--no-progress"]) == 0
    assert json.loads((tmp_path / "all" / "datalist.json").read_text())["classes"] == ["No Finding", "Finding"]
    (tmp_path / "bad.csv").write_text("Image Index,Patient ID\nx.png,1\n")
    capsys.readouterr()
    assert script.main([str(images), str(tmp_path / "bad.csv"), "--out", str(tmp_path / "none")]) == 2
    assert "error: " in capsys.readouterr().err and not (tmp_path / "none" / "datalist.json").exists()
