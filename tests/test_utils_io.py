import json

import nibabel as nib
import numpy as np
import pytest

from meddiff3d.utils.io import (PREVIEW_INFO_KEY, PREVIEW_MIN_VIEW, atomic_path, read_channels, save_json,
                                save_nifti, save_preview_png, save_vector_nifti)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "vol.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_atomic_path_replaces_existing(tmp_path):
    target = tmp_path / "a.json"
    save_json({"v": 1}, target)
    save_json({"v": 2}, target)
    assert json.loads(target.read_text()) == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_save_nifti_geometry_nibabel_and_sitk(tmp_path):
    import SimpleITK as sitk

    affine = np.array([[2.0, 0, 0, -80], [0, 1.5, 0, -112], [0, 0, 1.0, -70], [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((8, 10, 12)).astype(np.float64)
    path = save_nifti(data, affine, tmp_path / "v.nii.gz")
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, affine)
    assert img.header.get_zooms() == (2.0, 1.5, 1.0)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    itk_img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(itk_img.GetSpacing(), (2.0, 1.5, 1.0))
    # ITK is LPS: x and y of the origin flip sign
    np.testing.assert_allclose(itk_img.GetOrigin(), (80.0, 112.0, -70.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(itk_img).transpose(2, 1, 0), data.astype(np.float32))


def _views(path):
    """The preview's views as RGB arrays, cut out with the layout the PNG records."""
    from PIL import Image

    img = Image.open(path)
    info = json.loads(img.text[PREVIEW_INFO_KEY])
    rgb = np.asarray(img.convert("RGB"))
    return {name: rgb[top:bottom, left:right] for name, (left, top, right, bottom) in info["views"].items()}, info


def test_preview_png(tmp_path):
    from PIL import Image

    vol = np.zeros((20, 24, 16), np.float32)
    vol[5:15, 6:18, 4:12] = 1
    path = save_preview_png(vol, tmp_path / "p.png", overlay=vol > 0.5, title="t")
    img = Image.open(path)
    views, info = _views(path)
    # axial (y by x), coronal (z by x), sagittal (z by y) side by side, each at least 256 px a side, on one mm scale
    assert list(views) == ["axial", "coronal", "sagittal"]
    assert all(min(v.shape[:2]) >= PREVIEW_MIN_VIEW == 256 for v in views.values())
    assert views["axial"].shape[:2] == (24 * 16, 20 * 16) and views["coronal"].shape[:2] == (256, 320)
    assert views["sagittal"].shape[:2] == (256, 24 * 16) and info["px_per_mm"] == 16
    assert img.size[0] >= 3 * 256 and info["convention"] == "radiological" and info["legend"] == ["overlay"]
    assert np.asarray(img).std() > 0
    with pytest.raises(ValueError, match="3D"):
        save_preview_png(np.zeros((4, 4)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("affine_kind", ["ras", "lps"])
def test_preview_orientation_follows_the_affine_and_the_convention(tmp_path, affine_kind):
    """A bright blob in the patient's left, anterior, superior corner: radiological views draw it on the image right
    (neurological on the left), anterior / superior up, whatever the order of the file's voxel axes."""
    vol = np.zeros((20, 24, 16), np.float32)
    vol[2:6, 16:22, 4:12] = 1.0  # RAS voxel axes: small x = patient's left, large y = anterior
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    if affine_kind == "lps":  # the same head stored with x and y reversed (LPS voxel order)
        vol = vol[::-1, ::-1].copy()
        affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    halves = {}
    for convention in ("radiological", "neurological"):
        path = save_preview_png(vol, tmp_path / f"{convention}.png", affine=affine, convention=convention)
        views, info = _views(path)
        assert info["convention"] == convention
        axial = views["axial"].astype(float).mean(-1)
        half_w, half_h = axial.shape[1] // 2, axial.shape[0] // 2
        halves[convention] = (axial[:, :half_w].mean(), axial[:, half_w:].mean())
        assert axial[:half_h].mean() > axial[half_h:].mean()  # anterior up
        expected = np.array([24 * 2.0, 20 * 2.0]) * info["px_per_mm"]  # square millimetres: 2 mm voxels
        assert np.abs(np.array(views["axial"].shape[:2]) - expected).max() <= 1
    assert halves["radiological"][1] > halves["radiological"][0]  # patient's left on the image right
    assert halves["neurological"][0] > halves["neurological"][1]
    with pytest.raises(ValueError, match="convention"):
        save_preview_png(vol, tmp_path / "x.png", convention="upside-down")


def test_preview_overlay_is_coloured_per_label_with_a_legend(tmp_path):
    vol = np.full((16, 16, 16), 0.5, np.float32)
    labels = np.zeros(vol.shape, np.uint8)
    labels[2:8, 2:14, 2:14], labels[8:14, 2:14, 2:14] = 1, 4
    legend = {1: ("core", (1.0, 0.0, 0.0)), 4: ("enhancing", (0.0, 0.0, 1.0))}
    path = save_preview_png(vol, tmp_path / "o.png", overlay=labels, legend=legend, notes=["threshold 0.5"])
    views, info = _views(path)
    assert info["legend"] == ["core", "enhancing"]
    pixels = views["axial"].reshape(-1, 3).astype(int)
    reddish = (pixels[:, 0] > pixels[:, 2] + 60).mean()
    bluish = (pixels[:, 2] > pixels[:, 0] + 60).mean()
    assert reddish > 0.2 and bluish > 0.2  # both labels drawn, each in its own colour


def test_vector_nifti_is_a_vector_for_nibabel_and_simpleitk(tmp_path):
    import SimpleITK as sitk

    affine = np.array([[2.0, 0, 0, -80], [0, 1.5, 0, -112], [0, 0, 1.0, -70], [0, 0, 0, 1]])
    channels = np.random.default_rng(0).random((3, 8, 10, 12)).astype(np.float32)
    path = save_vector_nifti(channels, affine, tmp_path / "v.nii.gz", names=["WT", "TC", "ET"], descrip="probs")
    img = nib.load(path)
    assert img.shape == (8, 10, 12, 1, 3) and img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == 1007 and img.header.get_intent() == ("vector", (), "WT,TC,ET")
    assert list(img.header["dim"][:6]) == [5, 8, 10, 12, 1, 3]
    np.testing.assert_allclose(img.affine, affine)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    # ITK / SimpleITK (and so 3D Slicer): a 3D image of 3-component pixels, not a 4D or 5D image
    itk_img = sitk.ReadImage(str(path))
    assert itk_img.GetDimension() == 3 and itk_img.GetSize() == (8, 10, 12)
    assert itk_img.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(itk_img.GetSpacing(), (2.0, 1.5, 1.0))
    np.testing.assert_allclose(itk_img.GetOrigin(), (80.0, 112.0, -70.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(itk_img).transpose(2, 1, 0, 3), np.moveaxis(channels, 0, -1))
    data, read_affine = read_channels(path)
    np.testing.assert_allclose(data, np.moveaxis(channels, 0, -1))
    np.testing.assert_allclose(read_affine, affine)
    legacy = save_nifti(np.moveaxis(channels, 0, -1), affine, tmp_path / "legacy.nii.gz")  # channel-last 4D
    np.testing.assert_allclose(read_channels(legacy)[0], data)
    with pytest.raises(ValueError, match="channels"):
        save_vector_nifti(channels[0], affine, tmp_path / "bad.nii.gz")


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_json({}, tmp_path / "m.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
