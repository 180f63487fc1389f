"""The plain-Python parts of the MONAI Label app (no MONAI Label needed, core environment): Slicer writers and their
geometry, request parameters, how the four BraTS sequences arrive, the stdlib client's multipart encoding, the
serve command's app folder."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from meddiff3d.data.images import read_image
from meddiff3d.errors import InputError
from meddiff3d.label import client, params, sequences, serve
from meddiff3d.label.bundles import resample_to_reference
from meddiff3d.label.slicer_io import (ANOMALY_SEGMENTS, BRATS_SEGMENTS, read_nrrd_header, write_float_volume,
                                       write_seg_nrrd)
from meddiff3d.utils.io import save_nifti



def oblique_affine():
    """An oblique, anisotropic, left-handed-free RAS affine (orthogonal axes, as NIfTI and ITK can both store)."""
    a, b = np.deg2rad(30), np.deg2rad(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([1.1, 1.2, 2.5])
    affine[:3, 3] = [40.0, -20.5, 7.25]
    return affine


OBLIQUE = oblique_affine()


def labels_volume(shape=(7, 9, 5)):
    rng = np.random.default_rng(0)
    return rng.choice([0, 1, 2, 4], size=shape, p=[0.7, 0.1, 0.1, 0.1]).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ writers
@pytest.mark.parametrize("compress", [True, False])
def test_seg_nrrd_round_trips_voxels_and_geometry_through_simpleitk(tmp_path, compress):
    labels = labels_volume()
    path = write_seg_nrrd(labels, OBLIQUE, tmp_path / "a.seg.nrrd", BRATS_SEGMENTS, compress=compress)
    array, affine = read_image(path)  # SimpleITK reader, LPS -> RAS
    np.testing.assert_array_equal(array, labels)
    np.testing.assert_allclose(affine, OBLIQUE, atol=1e-9)
    image = sitk.ReadImage(str(path))
    # LPS: x and y of the RAS affine flip sign
    np.testing.assert_allclose(image.GetOrigin(), [-40.0, 20.5, 7.25])
    np.testing.assert_allclose(image.GetSpacing(), np.linalg.norm(OBLIQUE[:3, :3], axis=0))


def test_seg_nrrd_names_every_segment_with_its_value_and_extent(tmp_path):
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:3, 2:5, 4] = 4
    path = write_seg_nrrd(labels, np.eye(4), tmp_path / "b.seg.nrrd", BRATS_SEGMENTS)
    fields, kv = read_nrrd_header(path)
    assert fields["space"] == "left-posterior-superior" and fields["type"] == "unsigned char"
    assert kv["Segmentation_MasterRepresentation"] == "Binary labelmap"
    names = {kv[f"Segment{i}_Name"]: int(kv[f"Segment{i}_LabelValue"]) for i in range(3)}
    assert names == {s.name: s.value for s in BRATS_SEGMENTS}
    et = next(i for i in range(3) if kv[f"Segment{i}_LabelValue"] == "4")
    assert kv[f"Segment{et}_Extent"] == "1 2 2 4 4 4"
    assert kv["Segment0_Extent"] == "0 -1 0 -1 0 -1"  # NCR absent
    image = sitk.ReadImage(str(path))  # SimpleITK exposes the key/value pairs to Slicer-free checks
    assert image.GetMetaData("Segment0_Name") == BRATS_SEGMENTS[0].name


def test_seg_nrrd_matches_a_nifti_written_by_nibabel_voxel_for_voxel(tmp_path):
    labels = labels_volume((5, 4, 6))
    write_seg_nrrd(labels, OBLIQUE, tmp_path / "c.seg.nrrd", BRATS_SEGMENTS)
    save_nifti(labels, OBLIQUE, tmp_path / "c.nii.gz", dtype=np.uint8)
    from_nrrd = sitk.ReadImage(str(tmp_path / "c.seg.nrrd"))
    from_nifti = sitk.ReadImage(str(tmp_path / "c.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(from_nrrd), sitk.GetArrayFromImage(from_nifti))
    np.testing.assert_allclose(from_nrrd.GetDirection(), from_nifti.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(from_nrrd.GetOrigin(), from_nifti.GetOrigin(), atol=1e-5)


def test_seg_nrrd_refuses_label_values_without_a_segment_and_bad_geometry(tmp_path):
    with pytest.raises(ValueError, match=r"label values \[3\] have no segment"):
        write_seg_nrrd(np.full((3, 3, 3), 3, np.uint8), np.eye(4), tmp_path / "x.seg.nrrd", BRATS_SEGMENTS)
    with pytest.raises(ValueError, match="invalid affine"):
        write_seg_nrrd(np.zeros((3, 3, 3), np.uint8), np.zeros((4, 4)), tmp_path / "x.seg.nrrd", ANOMALY_SEGMENTS)
    assert not list(tmp_path.iterdir())


def test_float_volume_is_float32_nifti_on_the_given_affine(tmp_path):
    data = np.random.default_rng(1).normal(size=(4, 5, 6))
    path = write_float_volume(data, OBLIQUE, tmp_path / "f.nii.gz")
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, OBLIQUE, atol=1e-6)
    np.testing.assert_allclose(img.get_fdata(), data, rtol=1e-6)
    with pytest.raises(ValueError, match="NIfTI"):
        write_float_volume(data, OBLIQUE, tmp_path / "f.nrrd")


def test_a_4d_float_volume_is_written_as_a_vector_volume_not_a_sequence(tmp_path):
    data = np.random.default_rng(3).random((4, 5, 6, 3)).astype(np.float32)
    path = write_float_volume(data, OBLIQUE, tmp_path / "v.nii.gz", "three maps")
    img = nib.load(str(path))
    assert img.shape == (4, 5, 6, 1, 3) and int(img.header["intent_code"]) == 1007
    image = sitk.ReadImage(str(path))
    assert image.GetSize() == (4, 5, 6) and image.GetNumberOfComponentsPerPixel() == 3


@pytest.mark.parametrize("result", ["prob", "variance", "entropy"])
@pytest.mark.parametrize("region", ["WT", "TC", "ET"])
def test_segmentation_result_is_the_requested_region_of_the_vector_maps(tmp_path, monkeypatch, result, region):
    """run_segmentation reads the pipeline's vector files (X, Y, Z, 1, 3) and returns one region's 3D volume."""
    from meddiff3d.label import bundles
    from meddiff3d.pipelines.segmentation import output_paths
    from meddiff3d.utils.io import save_vector_nifti

    maps = {key: np.stack([np.full((5, 6, 7), 10 * k + c, np.float32) for c in range(3)])
            for k, key in enumerate(("prob", "variance", "entropy"))}

    def fake_segment_case(model, datalist, output_dir, params):
        paths = output_paths(output_dir, "case")
        for key, channels in maps.items():
            save_vector_nifti(channels, OBLIQUE, paths[key], names=["WT", "TC", "ET"])
        return paths

    monkeypatch.setattr(bundles, "segment_case", fake_segment_case)
    model = bundles.BundleModel("seg", "segmentation", tmp_path, {})
    sequences = [tmp_path / f"s{i}.nii.gz" for i in range(4)]
    out, info = bundles.run_segmentation(model, sequences, {"result": result, "region": region}, tmp_path)
    try:
        array, affine = read_image(out)
        c = ["WT", "TC", "ET"].index(region)
        assert array.shape == (5, 6, 7) and np.all(array == maps[result][c])
        np.testing.assert_allclose(affine, OBLIQUE, atol=1e-5)
        assert info == {"result": result, "region": region}
    finally:
        out.unlink()


def test_resampling_onto_the_same_grid_is_the_identity_and_follows_world_coordinates():
    vol = np.random.default_rng(2).random((6, 7, 8)).astype(np.float32)
    np.testing.assert_allclose(resample_to_reference(vol, OBLIQUE, vol.shape, OBLIQUE), vol, atol=1e-5)
    shifted = OBLIQUE.copy()
    shifted[:3, 3] += OBLIQUE[:3, 0]  # the reference starts one voxel further along i
    out = resample_to_reference(vol, OBLIQUE, (5, 7, 8), shifted)
    np.testing.assert_allclose(out, vol[1:], atol=1e-5)


# ------------------------------------------------------------------------------------------------ parameters
def test_params_defaults_and_the_untouched_config_list_mean_the_default():
    config = params.config_of(params.SEGMENTATION_PARAMS)
    parsed = params.parse_params(params.SEGMENTATION_PARAMS, {**config, "client_id": "x", "device": ["cpu"]})
    assert parsed == {"result": "label", "region": "WT", "num_samples": 3, "steps": 10, "sampler": "ddim",
                      "seed": 0, "threshold": 0.5}
    text = params.parse_params(params.SEGMENTATION_PARAMS, {"steps": "7", "result": ["prob"], "threshold": "0.3"})
    assert (text["steps"], text["result"], text["threshold"]) == (7, "prob", 0.3)


@pytest.mark.parametrize("request_params, message", [
    ({"steps": 0}, r"'steps' must be >= 1"),
    ({"steps": "many"}, r"'steps' must be a number"),
    ({"steps": 2.5}, r"'steps' must be an integer"),
    ({"num_samples": True}, r"'num_samples' must be a number"),
    ({"sampler": "magic"}, r"'sampler' must be one of ddim"),
    ({"result": ["prob", "entropy"]}, r"'result' must be one of"),
    ({"threshold": 1.5}, r"'threshold' must be"),
    ({"seed": float("nan")}, r"'seed' must be finite"),
])
def test_bad_segmentation_params_name_the_parameter(request_params, message):
    with pytest.raises(InputError, match=message):
        params.parse_params(params.SEGMENTATION_PARAMS, request_params)


@pytest.mark.parametrize("value, expected", [
    ("", None), ("none", None), ({}, None), ("age=0.7, sex=1", {"age": 0.7, "sex": 1.0}),
    ("{'age': 0.25}", {"age": 0.25}), ({"age": "0.5"}, {"age": 0.5}),
])
def test_covariates_from_text_or_mapping(value, expected):
    assert params.parse_params(params.GENERATION_PARAMS, {"covariates": value})["covariates"] == expected


@pytest.mark.parametrize("value, message", [
    ("age=1.5", r"parameter 'covariates': age=1.5 is outside \[0, 1\]"), ("age", "not 'name=value"),
    ("{age: }", "not a mapping"), ({"age": "old"}, r"age='old' is not a number"), (3, "must map covariate names"),
])
def test_bad_covariates_are_refused(value, message):
    with pytest.raises(InputError, match=message):
        params.parse_params(params.GENERATION_PARAMS, {"covariates": value})


# ------------------------------------------------------------------------------------------------ sequences
def write_case(folder, case="BraTS2021_00007", sep="_", names=("t1", "t1ce", "t2", "flair"), shape=(6, 7, 5),
               affine=OBLIQUE):
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate(names):
        files.append(save_nifti(np.full(shape, i + 1, np.float32), affine, folder / f"{case}{sep}{name}.nii.gz"))
    return files


def no_ids(image_id):
    return ""


@pytest.mark.parametrize("names, sep, pick", [(("t1", "t1ce", "t2", "flair"), "_", 3),
                                              (("t1n", "t1c", "t2w", "t2f"), "-", 0)])
def test_any_sequence_of_a_datastore_case_finds_its_three_siblings_in_order(tmp_path, names, sep, pick):
    files = write_case(tmp_path / "studies", sep=sep, names=names)
    write_case(tmp_path / "studies", case="other")  # another case beside it is not mixed in
    found = sequences.resolve_sequences(files[pick], {}, tmp_path / "work", no_ids)
    assert [f.name for f in found] == [f.name for f in files]


def test_a_case_with_three_sequences_names_the_missing_one(tmp_path):
    files = write_case(tmp_path, names=("t1", "t1ce", "flair"))
    with pytest.raises(InputError, match=r"3 of the 4 BraTS sequences .*missing: BraTS2021_00007_t2"):
        sequences.resolve_sequences(files[0], {}, tmp_path / "work", no_ids)


def test_an_unnamed_single_volume_says_how_to_send_four(tmp_path):
    path = save_nifti(np.zeros((4, 4, 4)), np.eye(4), tmp_path / "upload123.nii.gz")
    with pytest.raises(InputError, match="send params 'sequences' with four image ids"):
        sequences.resolve_sequences(path, {}, tmp_path, no_ids)


@pytest.mark.parametrize("channels", [4, 3])
def test_a_4d_volume_is_split_into_four_sequences_or_refused(tmp_path, channels):
    data = np.stack([np.full((5, 6, 7), c, np.float32) for c in range(channels)], axis=-1)
    path = save_nifti(data, OBLIQUE, tmp_path / "case.nii.gz")
    if channels != 4:
        with pytest.raises(InputError, match=r"has 3 channel\(s\).*needs 4 sequences"):
            sequences.resolve_sequences(path, {}, tmp_path / "work", no_ids)
        return
    found = sequences.resolve_sequences(path, {}, tmp_path / "work", no_ids)
    for c, f in enumerate(found):
        array, affine = read_image(f)
        assert array.shape == (5, 6, 7) and np.all(array == c)
        np.testing.assert_allclose(affine, OBLIQUE, atol=1e-6)


def test_a_4_component_nrrd_from_slicer_is_split_too(tmp_path):
    data = np.stack([np.full((5, 6, 7), c, np.float32) for c in range(4)], axis=-1)  # (i, j, k, c)
    image = sitk.GetImageFromArray(np.transpose(data, (2, 1, 0, 3)), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "vector.nrrd"))
    found = sequences.resolve_sequences(tmp_path / "vector.nrrd", {}, tmp_path / "work", no_ids)
    assert [int(read_image(f)[0].max()) for f in found] == [0, 1, 2, 3]


def test_explicit_sequence_ids_resolve_through_the_datastore(tmp_path):
    files = write_case(tmp_path, case="any", names=("a", "b", "c", "d"))
    by_id = {f"id{i}": str(f) for i, f in enumerate(files)}
    mapping = {"t1": "id0", "t1ce": "id1", "t2": "id2", "flair": "id3"}
    found = sequences.resolve_sequences(None, {"sequences": mapping}, tmp_path, lambda i: by_id.get(i, ""))
    assert [str(f) for f in found] == [str(f) for f in files]
    with pytest.raises(InputError, match="missing: flair"):
        sequences.resolve_sequences(None, {"sequences": {k: v for k, v in mapping.items() if k != "flair"}},
                                    tmp_path, by_id.get)
    with pytest.raises(InputError, match="lists 3 image ids"):
        sequences.resolve_sequences(None, {"sequences": ["id0", "id1", "id2"]}, tmp_path, by_id.get)
    with pytest.raises(InputError, match="no image 'nope' in the datastore"):
        sequences.resolve_sequences(None, {"sequences": ["id0", "id1", "id2", "nope"]}, tmp_path,
                                    lambda i: by_id.get(i, ""))


def test_sequences_on_different_grids_are_refused(tmp_path):
    files = write_case(tmp_path)
    save_nifti(np.zeros((6, 7, 5)), np.diag([2.0, 1, 1, 1]), files[2])
    with pytest.raises(InputError, match=r"sequence t2 .*affine differs"):
        sequences.resolve_sequences(files[0], {}, tmp_path / "work", no_ids)


# ------------------------------------------------------------------------------------------------ client, serve
def test_client_multipart_body_parses_back_into_its_fields_and_file(tmp_path):
    upload = tmp_path / "scan.nii.gz"
    upload.write_bytes(gzip.compress(b"voxels"))
    ctype, body = client.encode_multipart({"params": json.dumps({"steps": 3})}, {"file": str(upload)})
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
    parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
    assert json.loads(parts["params"].get_payload(decode=True)) == {"steps": 3}
    assert parts["file"].get_filename() == "scan.nii.gz"
    assert gzip.decompress(parts["file"].get_payload(decode=True)) == b"voxels"


def test_serve_writes_the_app_folder_and_the_offline_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    studies = tmp_path / "studies"
    studies.mkdir()
    args = parser.parse_args(["serve", "--studies", str(studies), "--port", "8123", "--app-dir", str(tmp_path / "app"),
                              "--bundles", "brain_mri_ldm", "seg=bundles/brats_mri_segdiff", "--dry-run"])
    assert serve.run(args) == 0
    cmd = capsys.readouterr().out.split()
    assert cmd[1:5] == ["-m", "monailabel.main", "start_server", "--app"]
    assert "--conf models brain_mri_ldm,seg" in " ".join(cmd)
    for key, value in serve.OFFLINE_CONF:
        assert f"--conf {key} {value}" in " ".join(cmd)
    assert (tmp_path / "app" / "model" / "seg" / "configs" / "inference.yaml").is_file()
    assert "MedDiff3DApp" in (tmp_path / "app" / "main.py").read_text()
    bad = parser.parse_args(["serve", "--studies", str(studies), "--bundles", "nope", "--dry-run"])
    with pytest.raises(InputError, match="not a bundle folder"):
        serve.run(bad)


def test_label_env_requirements_drop_only_jsonschema():
    from meddiff3d.label import env

    reqs = env.requirements()
    assert not any(r.startswith("jsonschema") for r in reqs)
    assert any(r.startswith("monailabel") for r in reqs) and any(r.startswith("nibabel") for r in reqs)
