import json

import nibabel as nib
import numpy as np
import pytest

from meddiff3d.utils.io import atomic_path, save_json, save_nifti, save_preview_png


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


def test_preview_png(tmp_path):
    from PIL import Image

    vol = np.zeros((20, 24, 16), np.float32)
    vol[5:15, 6:18, 4:12] = 1
    path = save_preview_png(vol, tmp_path / "p.png", overlay=vol > 0.5, title="t")
    img = Image.open(path)
    # axial (y by x), coronal (z by x), sagittal (z by y) side by side, each with a 2-pixel gap
    assert img.size == (20 + 2 + 20 + 2 + 24 + 2, 24)
    assert np.asarray(img).std() > 0
    with pytest.raises(ValueError, match="3D"):
        save_preview_png(np.zeros((4, 4)), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_atomic_outputs_get_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        path = save_json({}, tmp_path / "m.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
