"""Transform factories: RAS + world coordinates, target shape/spacing, readers, BraTS regions, inverse geometry."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from meddiff3d.data.transforms import (
    BRATS_REGIONS,
    BratsRegionsd,
    CovariatesToTensord,
    LoadVolumed,
    anomaly_transforms,
    brats_regions,
    brats_transforms,
    t1_brain_transforms,
    to_input_grid,
)
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_nifti

SHAPE = (16, 20, 18)


def blob_volume(center_vox, shape=SHAPE, sigma=2.0):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1)
    return (np.exp(-((grid - np.asarray(center_vox)) ** 2).sum(-1) / (2 * sigma**2)) * 100 + 1).astype(np.float32)


def lps_affine(spacing=(1.0, 1.0, 1.0), origin=(20.0, 30.0, -5.0)):
    """Axes pointing to L, P, S: what a DICOM/ITK volume with identity direction looks like in RAS."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = origin
    return affine


def oblique_affine():
    c, s = np.cos(np.deg2rad(15)), np.sin(np.deg2rad(15))
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.2, 1.0, 1.5])
    affine[:3, 3] = [5.0, -7.0, 3.0]
    return affine


def world_of_mass(tensor, affine):
    com = ndimage.center_of_mass(np.clip(np.asarray(tensor[0]) - np.asarray(tensor[0]).max() * 0.3, 0, None))
    return (np.asarray(affine, np.float64) @ np.append(com, 1.0))[:3]


@pytest.mark.parametrize("affine", [lps_affine(), lps_affine((1.2, 0.9, 1.5)), oblique_affine()],
                         ids=["lps", "lps-aniso", "oblique"])
def test_t1_transforms_end_ras_with_correct_world_coordinates(tmp_path, affine):
    center = (6.0, 12.0, 8.0)
    path = save_nifti(blob_volume(center), affine, tmp_path / "t1.nii.gz")
    out = t1_brain_transforms(spacing=(1.0, 1.0, 1.0), shape=(24, 28, 26), train=False)({"image": str(path)})
    image = out["image"]
    assert image.shape == (1, 24, 28, 26) and image.dtype == torch.float32
    out_affine = image.affine.numpy()
    # RAS: each voxel axis points mostly to +R, +A, +S; spacing is the target spacing
    assert (np.argmax(np.abs(out_affine[:3, :3]), axis=0) == [0, 1, 2]).all()
    assert (np.diag(out_affine[:3, :3]) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(out_affine[:3, :3], axis=0), 1.0, atol=1e-6)
    expected_world = (affine @ np.append(center, 1.0))[:3]
    np.testing.assert_allclose(world_of_mass(image, out_affine), expected_world, atol=0.3)
    assert float(image.min()) >= 0.0 and float(np.percentile(image.numpy(), 99)) <= 1.0 + 1e-6


def test_nrrd_and_dicom_load_like_nifti(tmp_path):
    from test_datalist_readers import write_dicom_series

    affine = lps_affine((1.2, 0.9, 1.5))
    data = (blob_volume((6, 12, 8)) * 10).astype(np.int16)
    nifti = save_nifti(data, affine, tmp_path / "a.nii.gz", dtype=np.int16)
    nrrd = tmp_path / "a.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(nrrd))
    dicom = write_dicom_series(data, affine, tmp_path / "dicom")
    transform = t1_brain_transforms(spacing=(1.0, 1.0, 1.0), shape=(24, 24, 32), train=False)
    ref = transform({"image": str(nifti)})["image"]
    for other in (nrrd, dicom):
        got = transform({"image": str(other)})["image"]
        torch.testing.assert_close(got.affine, ref.affine, atol=1e-3, rtol=0)
        torch.testing.assert_close(got.as_tensor(), ref.as_tensor(), atol=1e-4, rtol=1e-4)


def test_modalities_become_channels_in_order_and_singleton_4d_is_squeezed(tmp_path):
    files = []
    for i in range(3):
        data = np.full(SHAPE + ((1,) if i == 1 else ()), float(i + 1), np.float32)  # second file is x, y, z, 1
        files.append(str(save_nifti(data, np.eye(4), tmp_path / f"m{i}.nii.gz")))
    image = LoadVolumed("image")({"image": files})["image"]
    assert image.shape == (3, *SHAPE)
    assert [float(image[c].mean()) for c in range(3)] == [1.0, 2.0, 3.0]
    single = LoadVolumed("image")({"image": files[1]})["image"]
    assert single.shape == (1, *SHAPE)


def _brats_case(tmp_path, convention="brats2021"):
    et = 4 if convention == "brats2021" else 3
    rng = np.random.default_rng(0)
    affine = lps_affine((1.0, 1.0, 1.0))
    images = []
    for m in ("t1", "t1ce", "t2", "flair"):
        data = rng.random(SHAPE).astype(np.float32) * 100 + 50
        data[:2] = 0  # background
        images.append(str(save_nifti(data, affine, tmp_path / f"{convention}_{m}.nii.gz")))
    label = np.zeros(SHAPE, np.uint8)
    label[4:12, 5:15, 4:14] = 2
    label[6:10, 7:13, 6:12] = 1
    label[7:9, 9:11, 8:10] = et
    return {"image": images, "label": str(save_nifti(label, affine, tmp_path / f"{convention}_seg.nii.gz",
                                                      dtype=np.uint8))}, label


def test_brats_transforms_shape_spacing_and_normalisation(tmp_path):
    item, _ = _brats_case(tmp_path)
    out = brats_transforms(spacing=(1.0, 1.0, 1.0), shape=(24, 24, 24), train=False)(item)
    assert out["image"].shape == (4, 24, 24, 24) and out["label"].shape == (3, 24, 24, 24)
    np.testing.assert_allclose(np.linalg.norm(out["image"].affine[:3, :3].numpy(), axis=0), 1.0)
    for c in range(4):  # z-score over non-zero voxels, per channel
        channel = out["image"][c]
        brain = channel[channel != 0]
        assert abs(float(brain.mean())) < 1e-3 and abs(float(brain.std()) - 1) < 1e-2
    patches = brats_transforms(spacing=(1.0, 1.0, 1.0), shape=(24, 24, 24), train=True, patch_size=(8, 12, 8))
    patch = patches(item)
    assert patch["image"].shape == (4, 8, 12, 8) and patch["label"].shape == (3, 8, 12, 8)


def test_brats_regions_same_for_both_conventions(tmp_path):
    item21, label = _brats_case(tmp_path, "brats2021")
    item23, _ = _brats_case(tmp_path, "brats2023")
    transform = brats_transforms(spacing=(1.0, 1.0, 1.0), shape=SHAPE, train=False)
    out21, out23 = transform(item21)["label"], transform(item23)["label"]
    torch.testing.assert_close(out21.as_tensor(), out23.as_tensor())
    # check the regions against the label map (orientation LPS -> RAS flips the first two axes)
    ras = label[::-1, ::-1, :]
    expected = {"WT": ras > 0, "TC": (ras == 1) | (ras == 4), "ET": ras == 4}
    for c, name in enumerate(BRATS_REGIONS):
        np.testing.assert_array_equal(out21[c].numpy().astype(bool), expected[name], err_msg=name)
    # the item's convention (the datalist's label_convention) is used; a wrong one is an error naming the file
    loaded = LoadVolumed("label")(item23)
    with pytest.raises(InputError, match="brats2023_seg.nii.gz: label values \\[3\\] are not part of the brats2021"):
        BratsRegionsd("label")({**loaded, "convention": "brats2021"})


def test_brats_regions_auto_rejects_both_3_and_4():
    label = torch.zeros(1, 4, 4, 4)
    label[0, 0, 0, 0], label[0, 1, 1, 1] = 3, 4
    with pytest.raises(InputError, match="both labels 3 and 4"):
        brats_regions(label)


def test_covariates_vector_in_given_order():
    out = CovariatesToTensord(["sex", "age"])({"id": "a", "covariates": {"age": 0.25, "sex": 1.0}})
    torch.testing.assert_close(out["covariates"], torch.tensor([1.0, 0.25]))
    with pytest.raises(InputError, match="item a: covariates \\['sex'\\] missing"):
        CovariatesToTensord(["sex"])({"id": "a", "covariates": {"age": 0.25}})
    t1 = t1_brain_transforms(shape=(8, 8, 8), covariates=["age"])
    assert any(isinstance(t, CovariatesToTensord) for t in t1.transforms)


@pytest.mark.parametrize("use_transform", [False, True], ids=["resample", "invertd"])
def test_identity_network_round_trip_is_exact_inside_fov(tmp_path, use_transform):
    affine = lps_affine((1.0, 1.0, 1.0))
    data = blob_volume((6, 12, 8))
    path = save_nifti(data, affine, tmp_path / "a.nii.gz")
    transform = anomaly_transforms(spacing=(1.0, 1.0, 1.0), shape=(12, 24, 12), train=False)  # crops x, z; pads y
    item = transform({"image": str(path)})
    back = to_input_grid(item["image"].as_tensor(), item, transform if use_transform else None)
    assert tuple(back.shape) == (1, *SHAPE)
    np.testing.assert_allclose(back.affine.numpy(), affine, atol=1e-6)
    scaled = (data - data.min()) / (np.percentile(data, 99.5) - data.min())  # the percentile normalisation
    inside = np.zeros(SHAPE, bool)
    inside[2:14, :, 3:15] = True  # the centre crop of 12 (x) and 12 (z) voxels
    np.testing.assert_allclose(back[0].numpy()[inside], scaled[inside], atol=1e-5)
    assert np.abs(back[0].numpy()[~inside]).max() < 1e-6  # zero outside the network FOV


def test_round_trip_on_anisotropic_oblique_input_and_batches(tmp_path):
    affine = oblique_affine()
    data = blob_volume((8, 10, 9), sigma=4.0)
    path = save_nifti(data, affine, tmp_path / "a.nii.gz")
    transform = anomaly_transforms(spacing=(1.0, 1.0, 1.0), shape=(32, 32, 32), train=False)
    item = transform({"image": str(path), "label": str(path)})
    outputs = {"pred": item["image"].as_tensor(), "mask": (item["label"] > 50).float().as_tensor()}
    back = to_input_grid(outputs, item)
    via_invertd = to_input_grid(outputs["pred"], item, transform)
    for value in (back["pred"], back["mask"], via_invertd):
        assert tuple(value.shape) == (1, *SHAPE)
        np.testing.assert_allclose(value.affine.numpy(), affine, atol=1e-5)
    scaled = (data - data.min()) / (np.percentile(data, 99.5) - data.min())
    interior = (slice(2, -2),) * 3  # away from the border where interpolation meets padding
    np.testing.assert_allclose(back["pred"][0].numpy()[interior], scaled[interior], atol=0.03)
    # the two ways agree away from the border (where Spacing's inverse pads with "border", the direct way with zeros)
    torch.testing.assert_close(back["pred"][0][interior], via_invertd[0][interior], atol=1e-4, rtol=0)
    # a collated batch maps item by item
    from monai.data import list_data_collate

    batch = list_data_collate([item, item])
    mapped = to_input_grid(torch.stack([outputs["pred"]] * 2), batch)
    assert len(mapped) == 2 and tuple(mapped[1].shape) == (1, *SHAPE)
    np.testing.assert_allclose(mapped[1].affine.numpy(), affine, atol=1e-5)
