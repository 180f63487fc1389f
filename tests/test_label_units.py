"""The plain-Python parts of the MONAI Label app (no MONAI Label needed, core environment): Slicer writers and their
geometry, request parameters, how the four BraTS sequences arrive, the stdlib client's multipart encoding, the
serve command's app folder."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import gzip
import io
import json
import re
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from meddiff3d.data.images import read_image
from meddiff3d.errors import InputError
from meddiff3d.label import client, params, request, sequences, serve
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
    # generation samples as the model file says unless asked otherwise (the bundle's sampler: null, steps: null)
    config = params.config_of(params.GENERATION_PARAMS)
    assert config["steps"] == "" and config["sampler"][0] == params.MODEL_OWN
    assert set(config["sampler"][1:]) == set(params.SAMPLER_CHOICES)
    own = params.parse_params(params.GENERATION_PARAMS, config)
    assert (own["steps"], own["sampler"]) == (None, params.MODEL_OWN)
    chosen = params.parse_params(params.GENERATION_PARAMS, {"steps": "12", "sampler": ["dpmpp_2m"]})
    assert (chosen["steps"], chosen["sampler"]) == (12, "dpmpp_2m")


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


# ------------------------------------------------------------------------------------------------ hostile requests
def header_only_nifti(path, shape):
    """A ``.nii.gz`` whose header claims ``shape`` (float32) but that holds no voxel: the 82-byte upload of issue 13."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


@pytest.mark.parametrize("text, message", [
    ("{", "params is not valid JSON"), ("[1, 2]", "must be a JSON object {name: value}, got a list"),
    ('"steps"', "got a string"), ("null", "got null"), ("7", "got a number"),
])
def test_params_that_are_not_a_json_object_are_refused(text, message):
    with pytest.raises(InputError, match=re.escape(message)):
        params.parse_params_json(text)


def test_params_json_is_read_and_empty_means_none():
    assert params.parse_params_json('{"steps": 3}') == {"steps": 3}
    assert params.parse_params_json("") == params.parse_params_json(None) == {}


def test_unknown_parameter_names_are_refused_with_a_did_you_mean():
    with pytest.raises(InputError, match=r"unknown parameter 'stepz' \(did you mean 'steps'\?\) for model 'seg'"):
        params.check_param_names(params.SEGMENTATION_PARAMS, {"stepz": 5}, ("sequences",), "model 'seg'")
    with pytest.raises(InputError, match="unknown parameters 'image', 'device'"):  # never override the request's own
        params.check_param_names(params.ANOMALY_PARAMS, {"image": "/etc/x.nii", "device": "cuda"})
    params.check_param_names(params.SEGMENTATION_PARAMS, {"steps": 5, "sequences": [], "client_id": "c",
                                                          "result_extension": ".nrrd", "result_dtype": "uint8"},
                             ("sequences",))


@pytest.mark.parametrize("filename, stored", [
    ("scan.nii.gz", "scan.nii.gz"), ("/home/me/data/scan.nii.gz", "scan.nii.gz"),  # MONAILabelClient: full path
    ("C:\\Users\\me\\scan.nrrd", "scan.nrrd"), ("../../etc/cron.d/job.nii", "job.nii"), (None, "upload.nii.gz"),
])
def test_uploads_are_stored_inside_the_scratch_folder_under_their_file_name(tmp_path, filename, stored):
    path = request.save_upload(io.BytesIO(b"bytes"), filename, tmp_path / "scratch")
    assert path == tmp_path / "scratch" / stored and path.read_bytes() == b"bytes"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [stored]


@pytest.mark.parametrize("filename", ["..", "a/..", "scan\x00.nii.gz", "scan\n.nii.gz", "x/", " "])
def test_unsafe_upload_names_are_refused_and_nothing_is_written(tmp_path, filename):
    with pytest.raises(InputError, match="uploaded file name .* is not a safe file name"):
        request.save_upload(io.BytesIO(b"bytes"), filename, tmp_path / "scratch")
    assert not (tmp_path / "scratch").exists()


def test_request_names_show_the_users_names_not_server_paths(tmp_path):
    names = request.RequestNames()
    upload = tmp_path / "req" / "upload" / "mycase.nii.gz"
    names.add(upload, "mycase.nii.gz")
    names.add(tmp_path / "work" / "case.nii.gz", "mycase.nii.gz", basename=True)
    names.add_folder(tmp_path / "work")
    text = (f"{upload}: bad header; {tmp_path}/work/case.nii.gz: all voxels are 0; case.nii.gz again; "
            f"{tmp_path}/work/out/case_mask.nii.gz")
    assert names.message(text) == ("mycase.nii.gz: bad header; mycase.nii.gz: all voxels are 0; mycase.nii.gz "
                                   "again; out/case_mask.nii.gz")
    assert names.name_of(upload) == "mycase.nii.gz" and names.name_of(tmp_path / "other.nrrd") == "other.nrrd"


@pytest.mark.parametrize("shape", [(512, 512, 512), (10000, 10000, 10000)])
def test_header_bombs_are_refused_from_the_header_alone(tmp_path, shape):
    bomb = header_only_nifti(tmp_path / "bomb.nii.gz", shape)
    assert bomb.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(InputError, match=rf"reference image {re.escape(str(bomb))}: grid \({shape[0]}, .*voxels; "
                                         rf"at most {request.MAX_REQUEST_VOXELS}"):
        request.check_input_grid(bomb, "reference image")
    assert time.perf_counter() - start < 2
    assert request.check_input_grid(header_only_nifti(tmp_path / "ok.nii.gz", (240, 240, 155))).shape == (240, 240, 155)


def test_a_4d_header_bomb_is_refused_before_it_is_split(tmp_path, monkeypatch):
    bomb = header_only_nifti(tmp_path / "four.nii.gz", (512, 512, 512, 4))
    monkeypatch.setattr(sequences, "split_4d_volume", lambda *a: pytest.fail("the voxels were read"))
    with pytest.raises(InputError, match=r"four.nii.gz: grid \(512, 512, 512\) is 1.34e\+08 voxels"):
        sequences.resolve_sequences(bomb, {}, tmp_path / "work", no_ids)


def test_a_truncated_4d_upload_is_an_image_error(tmp_path):
    cut = header_only_nifti(tmp_path / "cut.nii.gz", (8, 8, 8, 4))
    with pytest.raises(InputError, match="cut.nii.gz: unreadable or truncated NIfTI data"):
        sequences.resolve_sequences(cut, {}, tmp_path / "work", no_ids)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="garbage.nii.gz: unreadable"):
        sequences.resolve_sequences(garbage, {}, tmp_path / "work", no_ids)


@pytest.mark.parametrize("kind, pipeline, function", [("generation", "generation", "generate"),
                                                      ("anomaly", "anomaly", "detect_anomalies")])
def test_a_header_bomb_stops_a_request_before_any_model_runs(tmp_path, monkeypatch, kind, pipeline, function):
    import importlib

    from meddiff3d.label import bundles

    monkeypatch.setattr(importlib.import_module(f"meddiff3d.pipelines.{pipeline}"), function,
                        lambda *a, **k: pytest.fail("the pipeline ran"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "upload").mkdir()
    bomb = header_only_nifti(tmp_path / "upload" / "bomb.nii.gz", (512, 512, 512))
    names = request.RequestNames()
    names.add(bomb, "bomb.nii.gz")
    model = bundles.BundleModel("m", kind, tmp_path, {k: tmp_path / k for k in bundles.MODEL_FILES[kind]})
    parsed = params.parse_params(model.params, {})
    with pytest.raises(InputError) as info:
        bundles.run_request(model, str(bomb), {}, parsed, no_ids, names)
    message = names.message(str(info.value))
    assert "bomb.nii.gz: grid (512, 512, 512)" in message and str(tmp_path) not in message
    assert list((tmp_path / "tmp").iterdir()) == []  # the scratch folder is gone


def fake_detector(outcome):
    """A detect_anomalies stand-in: writes the case's mask, or fails naming its input as the pipeline's checks do."""
    def detect(codec, diffusion, calibration, inputs, output_dir, **kwargs):
        from meddiff3d.errors import ImageError
        from meddiff3d.pipelines.anomaly import OUTPUT_SUFFIXES

        if outcome == "fail":
            raise ImageError(f"{inputs[0]}: all voxels are 0 (an empty volume); an image with content is required")
        save_nifti(np.ones((6, 7, 5), np.uint8), OBLIQUE, Path(output_dir) / f"case{OUTPUT_SUFFIXES['mask']}")
        return [{"volume_score": 0.5, "anomalous": True}]
    return detect


@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_an_anomaly_request_names_the_users_image_and_leaves_only_its_result(tmp_path, monkeypatch, outcome):
    import meddiff3d.pipelines.anomaly as anomaly_pipeline
    from meddiff3d.label import bundles

    monkeypatch.setattr(anomaly_pipeline, "detect_anomalies", fake_detector(outcome))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    upload = save_nifti(np.ones((6, 7, 5), np.float32), OBLIQUE, tmp_path / "upload" / "my scan.nii.gz")
    names = request.RequestNames()
    names.add(upload, "my scan.nii.gz")
    model = bundles.BundleModel("anom", "anomaly", tmp_path, {k: tmp_path / k for k in bundles.MODEL_FILES["anomaly"]})
    if outcome == "fail":
        with pytest.raises(InputError) as info:
            bundles.run_request(model, str(upload), {}, {"result": "mask"}, no_ids, names)
        assert names.message(str(info.value)) == ("my scan.nii.gz: all voxels are 0 (an empty volume); an image with "
                                                  "content is required")
        assert list((tmp_path / "tmp").iterdir()) == []
    else:
        out, result = bundles.run_request(model, str(upload), {}, {"result": "mask"}, no_ids, names)
        assert result["anomalous"] and out.name.endswith(".seg.nrrd")
        assert list((tmp_path / "tmp").iterdir()) == [out]  # the scratch folder is gone, the result moved out


def test_call_with_timeout_stops_the_computation_in_its_own_thread():
    import threading

    import torch

    def compute():
        x = torch.ones(32, 32, 32)
        while True:  # a pipeline's own `except Exception` must not swallow the stop
            try:
                x = torch.nn.functional.avg_pool3d(x[None, None], 3, 1, 1)[0, 0]
            except Exception:  # noqa: BLE001
                pass

    outcome = {}

    def worker():
        start = time.perf_counter()
        try:
            request.call_with_timeout(compute, 0.3)
        except request.RequestTimeout:
            outcome["stopped_after"] = time.perf_counter() - start
        outcome["then"] = request.call_with_timeout(lambda a, b: a + b, 5, 2, b=3)  # the thread is usable again

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()  # no computing thread left behind
    assert 0.3 <= outcome["stopped_after"] < 3 and outcome["then"] == 5
    assert request.call_with_timeout(lambda: "no limit", 0) == "no limit"
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer)]


def test_serve_passes_the_infer_endpoint_and_the_time_limit(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    studies = tmp_path / "studies"
    studies.mkdir()
    args = parser.parse_args(["serve", "--studies", str(studies), "--app-dir", str(tmp_path / "app"), "--timeout",
                              "90", "--dry-run"])
    assert serve.run(args) == 0
    cmd = " ".join(capsys.readouterr().out.split())
    assert "--uvicorn_app meddiff3d.label.server:app" in cmd and "--conf request_timeout 90" in cmd
    default = parser.parse_args(["serve", "--studies", str(studies), "--app-dir", str(tmp_path / "app"), "--dry-run"])
    serve.run(default)
    assert f"--conf request_timeout {request.DEFAULT_TIMEOUT_S:g}" in capsys.readouterr().out
    with pytest.raises(InputError, match="--timeout must be a finite number >= 0"):
        serve.run(parser.parse_args(["serve", "--studies", str(studies), "--timeout", "-1", "--dry-run"]))
