"""The 2D readers (meddiff3d.data.images2d) on real DICOM files (pydicom's bundled test data, decoded by pydicom as
the reference) and on PNG / NIfTI files written here, and their refusals."""

from __future__ import annotations

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
