"""images.py readers: NIfTI, NRRD and DICOM series give the same array and RAS affine; ITK's LPS is converted."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from meddiff3d.data.images import array_to_sitk, check_image, read_header, read_image
from meddiff3d.errors import ImageError
from meddiff3d.utils.io import save_nifti

SHAPE = (16, 20, 18)


def oblique_affine():
    """An oblique, non-isotropic RAS affine with a flipped axis (like an LPS-stored volume)."""
    rotation = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.1, 0.9, 1.4])
    affine[:3, 3] = [31.5, -12.25, 8.0]
    return affine


def volume(dtype=np.int16):
    rng = np.random.default_rng(0)
    return (rng.random(SHAPE) * 1000).astype(dtype)


def write_dicom_series(array, affine, folder):
    """Write an int16 volume as a DICOM series with SimpleITK (one file per slice, geometry in the tags)."""
    image = array_to_sitk(array, affine)
    folder.mkdir(parents=True)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series_tags = {
        "0008|0060": "MR",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
        "0020|000e": "1.2.826.0.1.3680043.2.1125.2",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[0:7:3], *direction[1:8:3])),
        "0008|103e": "meddiff3d test",
    }
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in series_tags.items():
            slice_.SetMetaData(tag, value)
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{k + 1}")
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_)
    return folder


def test_nifti_read_by_simpleitk_has_lps_geometry(tmp_path):
    affine = oblique_affine()
    path = save_nifti(volume(np.float32), affine, tmp_path / "a.nii.gz")
    image = sitk.ReadImage(str(path))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-5)
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(image.GetOrigin(), flip @ affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), flip @ affine[:3, :3] / spacing, atol=1e-5)
    # and our reader gives back the nibabel affine and the voxel order (i, j, k)
    array, back = read_image(path)
    np.testing.assert_allclose(back, affine, atol=1e-5)
    assert array.shape == SHAPE


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha"])
def test_itk_formats_read_like_nifti(tmp_path, suffix):
    affine, data = oblique_affine(), volume(np.float32)
    nifti = save_nifti(data, affine, tmp_path / "a.nii.gz")
    other = tmp_path / f"a{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(other))
    a_array, a_affine = read_image(nifti)
    b_array, b_affine = read_image(other)
    np.testing.assert_array_equal(a_array, b_array)
    np.testing.assert_allclose(a_affine, b_affine, atol=1e-5)
    info = read_header(other)
    assert info.shape == SHAPE and info.format == "itk"
    np.testing.assert_allclose(info.affine, a_affine, atol=1e-5)


@pytest.mark.parametrize("left_handed", [False, True])
def test_dicom_series_reads_like_nifti(tmp_path, left_handed):
    affine, data = oblique_affine(), volume(np.int16)
    if not left_handed:
        affine[:3, 0] *= -1
    nifti = save_nifti(data, affine, tmp_path / "a.nii.gz", dtype=np.int16)
    folder = write_dicom_series(data, affine, tmp_path / "dicom")
    a_array, a_affine = read_image(nifti)
    b_array, b_affine = read_image(folder)
    if left_handed:
        # DICOM slices are stacked along row x column (right-handed): the k axis comes back reversed, the same
        # voxels sit at the same world positions
        b_array = b_array[:, :, ::-1]
        flip_k = np.eye(4)
        flip_k[2, 2], flip_k[2, 3] = -1, SHAPE[2] - 1
        b_affine = b_affine @ flip_k
    np.testing.assert_array_equal(a_array, b_array)
    np.testing.assert_allclose(a_affine, b_affine, atol=1e-3)
    assert check_image(folder).format == "dicom"


def test_folder_without_dicom_series(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match="0 DICOM series"):
        read_image(tmp_path / "empty")


def test_unsupported_suffix(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    with pytest.raises(ImageError, match="unsupported image format"):
        read_image(tmp_path / "a.png")


def _volume(path, data, spacing=(1.0, 1.0, 1.0), dtype=np.float32):
    return save_nifti(data, np.diag([*spacing, 1.0]), path, dtype=dtype)


@pytest.mark.parametrize("data, spacing, dtype, message", [
    (np.zeros((8, 9, 10)), (1, 1, 1), np.float32, "all voxels are 0 (an empty volume)"),
    (np.full((8, 9, 10), 3.5), (1, 1, 1), np.float32, "all voxels have the value 3.5 (a constant volume)"),
    (np.random.default_rng(0).random((8, 9, 10)) * (1 + 1j), (1, 1, 1), np.complex64, "complex voxel values"),
    (np.random.default_rng(0).random((8, 9, 10)), (0.01, 0.01, 0.01), np.float32, "voxel spacing (0.01, 0.01, 0.01)"),
    (np.random.default_rng(0).random((8, 9, 10)), (1, 1, 100), np.float32, "outside the plausible range 0.1-10 mm"),
])
def test_check_image_content(tmp_path, data, spacing, dtype, message):
    path = _volume(tmp_path / "v.nii.gz", data, spacing, dtype)
    check_image(path)  # without content=True: readable, finite, 3D is all that is asked
    with pytest.raises(ImageError) as info:
        check_image(path, content=True)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_check_image_content_accepts_a_real_volume(tmp_path):
    from meddiff3d.data.images import SPACING_RANGE_MM

    assert SPACING_RANGE_MM == (0.1, 10.0)
    data = np.random.default_rng(0).integers(0, 300, (8, 9, 10))
    for spacing in ((0.1, 1, 10), (1, 1, 1)):
        info = check_image(_volume(tmp_path / "v.nii.gz", data, spacing, np.int16), content=True)
        assert info.shape == (8, 9, 10)


def test_a_huge_header_fails_before_reading(tmp_path, monkeypatch):
    import gzip

    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((10000, 10000, 10000))
    header.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii.gz"
    with gzip.open(path, "wb") as fh:  # a header claiming 4 TB of voxels and 100 bytes of data
        fh.write(header.binaryblock + b"\0" * 4 + b"\0" * 100)
    with pytest.raises(ImageError, match=r"huge.nii.gz: image of shape \(10000, 10000, 10000\) is 1e\+12 voxels"):
        check_image(path)
    assert read_header(path).shape == (10000, 10000, 10000)  # the header alone is fine
    small = save_nifti(np.ones((64, 64, 64), np.float32), np.eye(4), tmp_path / "small.nii.gz")
    monkeypatch.setenv("MEDDIFF3D_MAX_MEMORY_GB", "0.001")
    with pytest.raises(ImageError, match=r"reading .*small.nii.gz needs about 2.1 MB of memory"):
        read_image(small)


def test_t1_inputs_of_one_series_folder_and_of_series_sub_folders(tmp_path):
    """``datalist t1`` / ``detect -i`` find one volume in a folder that is itself one DICOM series (named after it),
    and one per series sub-folder; a folder holding two series' slices is refused, naming it."""
    from meddiff3d.data.t1_conversion import find_t1_inputs
    from meddiff3d.errors import InputError

    one = write_dicom_series(volume(), oblique_affine(), tmp_path / "sub-01")
    assert find_t1_inputs(one) == {"sub-01": one}
    write_dicom_series(volume(), oblique_affine(), tmp_path / "cohort" / "sub-02")
    assert set(find_t1_inputs(tmp_path / "cohort")) == {"sub-02"}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in sorted(one.iterdir())[:3]:
        (mixed / path.name).write_bytes(path.read_bytes())
    other = write_dicom_series(volume(), oblique_affine(), tmp_path / "other")
    for path in sorted(other.iterdir())[:3]:  # another series UID: the tags above are the same, so rewrite one
        image = sitk.ReadImage(str(path))
        image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.9")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(mixed / f"b_{path.name}"))
        writer.Execute(image)
    with pytest.raises(InputError, match=r"mixed: holds the slices of 2 DICOM series"):
        find_t1_inputs(mixed)
