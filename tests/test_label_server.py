"""The real MONAI Label server on 127.0.0.1, driven by ``monailabel.client.MONAILabelClient``: the three bundles
(tiny untrained models, 32x48x32) answer with files on the input's grid, bad requests get a clear 4xx while the server
stays up, and a burst of 50 mixed requests (some bad, some concurrent) leaves every good one answered. Hostile
requests (raw HTTP): malformed or list ``params``, no image, header bombs, unsafe upload names get a fast 422 naming
the user's file; no upload outlives its request; a request over the time limit gets a 504 and frees the server.

Runs in the label environment (``make label-venv``; ``make test`` runs it there with MEDDIFF3D_REQUIRE_LABEL=1, so a
missing MONAI Label fails instead of skipping). In an environment without MONAI Label the module is skipped.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

try:
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException
except ImportError:
    if os.environ.get("MEDDIFF3D_REQUIRE_LABEL") == "1":
        raise
    pytest.skip("MONAI Label is not installed in this environment: these tests run in .venv-label "
                "(make label-venv; make test runs them)", allow_module_level=True)

from meddiff3d.data.images import read_image
from meddiff3d.label.slicer_io import read_nrrd_header
from meddiff3d.utils.io import save_nifti

pytestmark = [pytest.mark.label, pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]
SHAPE = (32, 48, 32)
#: fast detector settings for an untrained pair (latent inpainting, one starting step)
DETECTOR = {"method": "latent_inpainting", "start_steps": [300], "steps": 4, "resample": 1, "smoothing_sigma": 0.7}
FAST_SEG = {"num_samples": 2, "steps": 2}
FAST_GEN = {"steps": 2, "covariates": "sex=1, age=0.6, ventricular_volume=0.3, brain_volume=0.5"}
TIMINGS: dict[str, list[float]] = {}


def copy_bundle(name: str, dest: Path, overlay: str | None = None) -> Path:
    root = dest / name
    shutil.copytree(REPO / "bundles" / name / "configs", root / "configs")
    (root / "models").mkdir()
    if overlay:
        (root / "configs" / "label.yaml").write_text(overlay)
    return root


def build_bundles(base: Path) -> dict[str, Path]:
    """The three bundles with tiny untrained models (and a calibration for the anomaly detector)."""
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.models.segdiff import save_untrained_model
    from meddiff3d.pipelines.anomaly import calibrate_anomaly
    from meddiff3d.pipelines.benchmark import untrained_pair

    overlay = ("codec_path: \"$@model_dir + '/codec.pt'\"\ndiffusion_path: \"$@model_dir + '/diffusion.pt'\"\n"
               "amp: none\n")  # untrained_pair's file names
    seg = copy_bundle("brats_mri_segdiff", base, "amp: none\n")
    save_untrained_model(seg / "models" / "model.pt", shape=SHAPE, spacing=(5.0, 5.0, 5.0))
    gen = copy_bundle("brain_mri_ldm", base, overlay)
    untrained_pair(gen / "models")
    anomaly = copy_bundle("brain_mri_anomaly_ldm", base, overlay)
    codec, diffusion = untrained_pair(anomaly / "models", conditioning="none", covariates=())
    cohort = write_cohort("anomaly", base / "anomaly_cohort", 6, seed=0, shape=SHAPE, source="procedural",
                          progress=False)
    calibrate_anomaly(codec, diffusion, cohort.datalist, anomaly / "models" / "calibration.json",
                      settings=DETECTOR, section="validation", max_volumes=2, device="cpu", amp="none",
                      progress=False)
    return {"segdiff": seg, "anomaly": anomaly, "generation": gen}


def build_studies(base: Path) -> dict[str, Path]:
    """A flat datastore: one complete BraTS case, one with three sequences, one T1; plus 4D files for uploads."""
    from meddiff3d.data.synthetic import write_cohort

    write_cohort("brats", base / "brats", 2, seed=1, shape=SHAPE, source="procedural", progress=False)
    studies = base / "studies"
    studies.mkdir()
    images = sorted((base / "brats" / "images").glob("*.nii.gz"))
    case = images[0].name.split("_")[0]
    files = {m: base / "brats" / "images" / f"{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")}
    for m, f in files.items():
        shutil.copy(f, studies / f"caseA_{m}.nii.gz")
        if m != "t2":
            shutil.copy(f, studies / f"caseB_{m}.nii.gz")  # three sequences only
    shutil.copy(files["t1"], studies / "brain.nii.gz")  # a single T1 (anomaly, generation reference)
    arrays = [read_image(f)[0] for f in files.values()]
    affine = read_image(files["t1"])[1]
    uploads = base / "uploads"
    return {"studies": studies, "t1": files["t1"],
            "four": save_nifti(np.stack(arrays, -1), affine, uploads / "four.nii.gz"),
            "three": save_nifti(np.stack(arrays[:3], -1), affine, uploads / "three.nii.gz")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, bundles: dict[str, Path], studies: Path, name: str, *extra: str) -> dict:
    """``meddiff3d label serve`` on a free port, its temp folder (TMPDIR) ``base/<name>_tmp``; waits until it answers."""
    port = free_port()
    tmp = base / f"{name}_tmp"
    tmp.mkdir()
    log_path = base / f"{name}.log"
    log = open(log_path, "w", encoding="utf-8")
    cmd = [sys.executable, "-m", "meddiff3d", "label", "serve", "--studies", str(studies), "--port",
           str(port), "--app-dir", str(base / f"{name}_app"),
           "--bundles", *[f"{name}={path}" for name, path in bundles.items()], *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TMPDIR=str(tmp))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            MONAILabelClient(url).info()
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"server did not start (exit {proc.poll()}):\n"
                            + log_path.read_text(encoding="utf-8", errors="replace")[-4000:])
            time.sleep(1)
    # MONAI Label writes its logging config there at start; everything else in it comes from requests
    return {"url": url, "proc": proc, "log": log, "tmp": tmp, "tmp_at_start": set(tmp_files(tmp))}


def tmp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_dir())


def stop_server(running: dict) -> None:
    running["proc"].terminate()
    try:
        running["proc"].wait(30)
    except subprocess.TimeoutExpired:
        running["proc"].kill()
    running["log"].close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("label")
    t0 = time.perf_counter()
    bundles = build_bundles(base)
    data = build_studies(base)
    running = start_server(base, bundles, data["studies"], "server")
    TIMINGS["setup_s"] = [time.perf_counter() - t0]
    yield {**running, "base": base, "bundles": bundles, **data}
    stop_server(running)
    print("\nlabel server timings:", json.dumps({k: [round(x, 2) for x in v] for k, v in TIMINGS.items()}))


def infer(server, model, image_id="", params=None, file=None, tmpdir=None, key=None):
    """(result path, result json) of one request; the time is recorded under ``key``."""
    client = MONAILabelClient(server["url"], tmpdir=str(tmpdir or server["base"]))
    start = time.perf_counter()
    out = client.infer(model, image_id, params or {}, file=str(file) if file else None)
    if key:
        TIMINGS.setdefault(key, []).append(time.perf_counter() - start)
    return out


def assert_on_grid(path, reference):
    array, affine = read_image(path)
    ref_array, ref_affine = read_image(reference)
    assert array.shape == ref_array.shape
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
    assert np.isfinite(array).all()
    return array


def error_of(server, model, image_id="", params=None, file=None):
    with pytest.raises(MONAILabelClientException) as info:
        infer(server, model, image_id, params, file)
    return str(info.value.msg)


# ------------------------------------------------------------------------------------------------ info
def test_info_lists_the_three_models_with_their_types_labels_and_options(server):
    info = MONAILabelClient(server["url"]).info()
    models = info["models"]
    assert set(models) == {"segdiff", "anomaly", "generation"}
    assert models["segdiff"]["type"] == "segmentation" and models["anomaly"]["type"] == "segmentation"
    assert models["generation"]["type"] == "others"
    assert set(models["segdiff"]["labels"].values()) == {1, 2, 4}
    assert models["segdiff"]["config"]["result"][0] == "label"
    assert info["datastore"]["total"] == 8  # caseA (4 sequences), caseB (3), brain


# ------------------------------------------------------------------------------------------------ each model
def test_segmentation_of_a_datastore_case_is_a_named_seg_nrrd_on_the_input_grid(server):
    path, result = infer(server, "segdiff", "caseA_flair", FAST_SEG, key="segmentation")
    assert path.endswith(".seg.nrrd") and result["result"] == "label"
    labels = assert_on_grid(path, server["t1"])
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    _, kv = read_nrrd_header(path)
    assert {kv[f"Segment{i}_Name"] for i in range(3)} == set(result["label_names"])


@pytest.mark.parametrize("result", ["prob", "variance", "entropy"])
def test_segmentation_float_results_are_float_volumes_of_one_region(server, result):
    path, info = infer(server, "segdiff", "caseA_t1", {**FAST_SEG, "result": result, "region": "TC"},
                       key="segmentation_float")
    assert path.endswith(".nii.gz") and info["region"] == "TC"
    values = assert_on_grid(path, server["t1"])
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1


def test_segmentation_of_an_uploaded_4d_volume(server):
    path, _ = infer(server, "segdiff", "", FAST_SEG, file=server["four"], key="segmentation_4d")
    assert_on_grid(path, server["t1"])


def test_segmentation_from_explicit_sequence_ids(server):
    ids = {m: f"caseA_{m}" for m in ("t1", "t1ce", "t2", "flair")}
    path, _ = infer(server, "segdiff", "brain", {**FAST_SEG, "sequences": ids})
    assert_on_grid(path, server["t1"])


@pytest.mark.parametrize("result, suffix", [("mask", ".seg.nrrd"), ("anomaly_map", ".nii.gz"), ("healed", ".nii.gz")])
def test_anomaly_results_on_the_input_grid(server, result, suffix):
    path, info = infer(server, "anomaly", "brain", {"result": result}, key="anomaly")
    assert path.endswith(suffix) and "volume_score" in info
    values = assert_on_grid(path, server["t1"])
    if result == "mask":
        assert set(np.unique(values)) <= {0, 1}


def test_generation_lands_on_the_reference_geometry_and_follows_the_seed(server):
    a, info = infer(server, "generation", "brain", {**FAST_GEN, "seed": 3}, key="generation")
    b, _ = infer(server, "generation", "brain", {**FAST_GEN, "seed": 3})
    c, _ = infer(server, "generation", "brain", {**FAST_GEN, "seed": 4})
    va, vb, vc = (assert_on_grid(p, server["t1"]) for p in (a, b, c))
    assert np.abs(va).sum() > 0 and info["covariates"]["age"] == 0.6
    np.testing.assert_array_equal(va, vb)
    assert not np.array_equal(va, vc)


# ------------------------------------------------------------------------------------------------ bad requests
@pytest.mark.parametrize("model, image_id, params, upload, status, message", [
    ("nosuchmodel", "brain", {}, None, 404, "unknown model 'nosuchmodel'; this server serves"),
    ("segdiff", "", {}, None, 422, "no input image: give the id of a datastore image"),
    ("segdiff", "nosuchimage", {}, None, 404, "no image 'nosuchimage' in the datastore"),
    ("segdiff", "caseB_flair", FAST_SEG, None, 422, "3 of the 4 BraTS sequences"),
    ("segdiff", "", FAST_SEG, "three", 422, "has 3 channel(s)"),
    ("segdiff", "brain", FAST_SEG, None, 422, "does not say which BraTS case"),
    ("segdiff", "caseA_t1", {"steps": -2}, None, 422, "'steps' must be >= 1"),
    ("segdiff", "caseA_t1", {"result": "everything"}, None, 422, "'result' must be one of"),
    ("anomaly", "brain", {"result": "mask", "result_extension": ".nrrd", "result_dtype": "uint8"}, None, 200, ""),
    ("anomaly", "brain", {"result": "mask", "extra": 1}, None, 422, "unknown parameter 'extra' for model 'anomaly'"),
    ("segdiff", "caseA_t1", {"stepz": 2}, None, 422, "unknown parameter 'stepz' (did you mean 'steps'?)"),
    ("generation", "brain", {"image": "/etc/hostname"}, None, 422, "unknown parameter 'image'"),
    ("segdiff", "../studies/caseA_t1", {}, None, 422, "image id '../studies/caseA_t1' is not a safe file name"),
    ("anomaly", "/etc/hostname", {}, None, 422, "image id '/etc/hostname' is not a safe file name"),  # never opened
    ("generation", "brain", {"covariates": "age=7"}, None, 422, "age=7 is outside [0, 1]"),
    ("generation", "brain", {"covariates": "shoe_size=0.5", "steps": 2}, None, 422, "shoe_size"),
    ("generation", "brain", {"sampler": "fastest"}, None, 422, "'sampler' must be one of"),
])
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(server, model, image_id, params, upload, status,
                                                                message):
    file = server[upload] if upload else None
    if status == 200:  # the keys MONAI Label's clients add to every request are not errors
        infer(server, model, image_id, params, file)
    else:
        text = error_of(server, model, image_id, params, file)
        assert f"Status: {status}" in text and message in text, text
    assert server["proc"].poll() is None
    assert "segdiff" in MONAILabelClient(server["url"]).info()["models"]


# ------------------------------------------------------------------------------------------------ hostile requests
def send(server, method, path, query, fields, files=()):
    """``(status, json answer, or the error's detail)`` of a raw multipart request: ``fields`` {name: text} sent as
    given, ``files`` ``(field, file name, path)``."""
    boundary = uuid.uuid4().hex
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                    for name, value in fields.items())
    for field, filename, file in files:
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n").encode() + Path(file).read_bytes() + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(f"{server['url']}{path}?{urllib.parse.urlencode(query)}", data=body,
                                     method=method,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read().decode("utf-8", "replace")
        try:
            return err.code, json.loads(text).get("detail", text)
        except (ValueError, AttributeError):
            return err.code, text


def post(server, model, params="{}", image="", upload=None, filename=None):
    """``POST /infer/<model>`` (answer as JSON): ``params`` sent as given (any text), ``upload`` a file sent under
    ``filename`` (default: its name)."""
    files = [("file", filename if filename is not None else Path(upload).name, upload)] if upload else []
    return send(server, "POST", f"/infer/{model}", {"image": image, "output": "json"}, {"params": params}, files)


def leftovers(server, wait=5.0):
    """Files and folders requests left in the server's temp folder, once they have had ``wait`` s to go (a result
    file goes after it is sent)."""
    deadline = time.monotonic() + wait
    while True:
        files = [f for f in tmp_files(server["tmp"]) if f not in server["tmp_at_start"]]
        if not files or time.monotonic() > deadline:
            return files
        time.sleep(0.2)


def header_only_nifti(path, shape):
    """A ``.nii.gz`` whose header claims ``shape`` (float32) and that holds no voxel (82 bytes for 512^3)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def assert_names_only_the_users_file(detail, server, name):
    assert name in detail, detail
    for server_path in (str(server["tmp"]), str(server["base"]), "meddiff3d-"):
        assert server_path not in detail, detail


@pytest.mark.parametrize("params, message", [
    ("{", "params is not valid JSON"),
    ("[1, 2]", "params must be a JSON object {name: value}, got a list"),
    ('"steps=2"', "got a string"),
    ('{"steps": 2, "stepz": 2}', "unknown parameter 'stepz' (did you mean 'steps'?)"),
])
def test_params_that_are_not_an_object_of_known_names_get_422(server, params, message):
    status, detail = post(server, "generation", params, image="brain")
    assert status == 422 and message in detail, (status, detail)


def test_a_request_without_an_image_gets_422(server):
    status, detail = post(server, "anomaly", "{}")
    assert status == 422 and "no input image" in detail, (status, detail)


@pytest.mark.parametrize("side", [512, 10000])
@pytest.mark.parametrize("model", ["generation", "anomaly", "segdiff"])
def test_header_bomb_uploads_get_a_fast_422_naming_the_upload(server, model, side):
    shape = (side,) * 3 + ((4,) if model == "segdiff" else ())  # segmentation: a 4-channel volume
    bomb = header_only_nifti(server["base"] / "bombs" / f"bomb_{side}_{model}.nii.gz", shape)
    assert bomb.stat().st_size < 200
    start = time.perf_counter()
    status, detail = post(server, model, json.dumps(FAST_SEG if model == "segdiff" else {}), upload=bomb)
    elapsed = time.perf_counter() - start
    assert status == 422 and f"bomb_{side}_{model}.nii.gz: grid ({side}, {side}, {side})" in detail, detail
    assert "voxels; at most" in detail
    assert_names_only_the_users_file(detail, server, bomb.name)
    assert elapsed < 10, elapsed
    assert leftovers(server) == []


@pytest.mark.parametrize("model, params, make", [
    ("anomaly", {}, "nan_t1"), ("segdiff", FAST_SEG, "nan_four"), ("generation", {"steps": 2}, "truncated")])
def test_errors_name_the_uploaded_file_never_the_servers_scratch_path(server, model, params, make):
    """The anomaly runner links its input to work_dir/case.nii.gz and the segmentation splits a 4D upload into
    work_dir/case_<seq>.nii.gz: errors raised on those files name the upload."""
    t1, affine = read_image(server["t1"])
    folder = server["base"] / "named"
    if make == "nan_t1":
        bad = t1.astype(np.float32)
        bad[3, 4, 5] = np.nan
        upload, expected = save_nifti(bad, affine, folder / "patient 07 T1.nii.gz"), "patient 07 T1.nii.gz: "
    elif make == "nan_four":
        four = np.stack([t1.astype(np.float32)] * 4, -1)
        four[3, 4, 5, 0] = np.nan
        upload, expected = save_nifti(four, affine, folder / "case-9.nii.gz"), "case-9.nii.gz (channel t1): "
    else:
        upload, expected = header_only_nifti(folder / "cut ref.nii.gz", SHAPE), "cut ref.nii.gz"
        upload.write_bytes(upload.read_bytes()[:-10])  # a truncated header
    status, detail = post(server, model, json.dumps(params), upload=upload)
    assert status == 422, (status, detail)
    assert expected in detail
    assert_names_only_the_users_file(detail, server, upload.name)
    assert leftovers(server) == []


def test_an_unsafe_session_id_gets_422(server):
    status, detail = send(server, "POST", "/infer/anomaly", {"session_id": "../../etc", "output": "json"},
                          {"params": "{}"})
    assert status == 422 and "session id '../../etc' is not a safe file name" in detail, (status, detail)


@pytest.mark.parametrize("filename, message", [
    ("..", "uploaded file name '..' is not a safe file name"),
    ("bad\x01name.nii.gz", "is not a safe file name"),
])
def test_unsafe_upload_names_get_422(server, filename, message):
    status, detail = post(server, "generation", "{}", upload=server["t1"], filename=filename)
    assert status == 422 and message in detail, (status, detail)
    assert leftovers(server) == []


def test_no_upload_outlives_its_request(server):
    """Success and every kind of failure: the server's temp folder is empty once each answer is sent."""
    assert post(server, "segdiff", json.dumps(FAST_SEG), upload=server["four"])[0] == 200
    assert leftovers(server) == []
    assert post(server, "generation", json.dumps({"steps": 2}), upload=server["t1"], filename="/c/me/ref.nii.gz")[0] \
        == 200
    assert leftovers(server) == []
    for model, params, upload in [("segdiff", json.dumps(FAST_SEG), server["three"]),  # 422 in the pipeline
                                  ("segdiff", "{", server["four"]),  # 422 before anything runs
                                  ("nosuchmodel", "{}", server["four"]),  # 404
                                  ("generation", '{"steps": 0}', server["t1"])]:
        status, detail = post(server, model, params, upload=upload)
        assert status in (404, 422), (status, detail)
        assert leftovers(server) == [], (model, params)


@pytest.mark.parametrize("endpoint, query, field, message", [
    ("image", {"image": "../escaped"}, "file", "image id '../escaped' is not a safe file name"),
    ("image", {"image": "/tmp/escaped"}, "file", "image id '/tmp/escaped' is not a safe file name"),
    ("label", {"image": "brain", "tag": "../../escaped"}, "label", "label tag '../../escaped' is not a safe file name"),
])
def test_datastore_uploads_under_unsafe_names_get_422_and_write_nothing(server, endpoint, query, field, message):
    status, detail = send(server, "PUT", f"/datastore/{endpoint}", query, {"params": "{}"},
                          [(field, "scan.nii.gz", server["t1"])])
    assert status == 422 and message in detail, (status, detail)
    assert not list(server["base"].glob("escaped*")) and not Path("/tmp/escaped.nii.gz").exists()
    assert leftovers(server) == []
    assert MONAILabelClient(server["url"]).info()["datastore"]["total"] == 8


@pytest.fixture(scope="module")
def quick_server(server):
    """A second server on the same bundles with a 3 s time limit."""
    running = start_server(server["base"], server["bundles"], server["studies"], "quick", "--timeout", "3")
    yield {**running, "base": server["base"], "t1": server["t1"]}
    stop_server(running)


def test_a_request_over_the_time_limit_gets_504_and_frees_the_server(quick_server):
    start = time.perf_counter()
    status, detail = post(quick_server, "generation", json.dumps({"steps": 1000, "sampler": "heun"}),
                          upload=quick_server["t1"])
    elapsed = time.perf_counter() - start
    assert status == 504 and "longer than the server's time limit of 3 s" in detail, (status, detail)
    assert elapsed < 60, elapsed
    assert leftovers(quick_server) == []
    status, _ = post(quick_server, "generation", json.dumps({"steps": 2}), image="brain")  # the next one runs
    assert status == 200
    assert quick_server["proc"].poll() is None


# ------------------------------------------------------------------------------------------------ burst
def test_a_burst_of_50_mixed_requests_answers_every_good_one(server, tmp_path):
    good = [("segdiff", "caseA_flair", FAST_SEG, None), ("anomaly", "brain", {"result": "anomaly_map"}, None),
            ("generation", "brain", {**FAST_GEN, "seed": 1}, None), ("segdiff", "", FAST_SEG, "four")]
    bad = [("nosuchmodel", "brain", {}, None), ("segdiff", "caseB_t1", FAST_SEG, None),
           ("generation", "brain", {"steps": "x"}, None), ("segdiff", "", FAST_SEG, "three")]
    plan = [(good + bad)[i % 8] for i in range(50)]  # 26 good, 24 bad, interleaved

    def one(i):
        model, image_id, params, upload = plan[i]
        folder = tmp_path / f"r{i}"
        folder.mkdir()
        start = time.perf_counter()
        try:
            path, _ = infer(server, model, image_id, params, server[upload] if upload else None, tmpdir=folder)
            return i, "ok", assert_on_grid(path, server["t1"]).shape, time.perf_counter() - start
        except MONAILabelClientException as err:
            return i, "error", str(err.msg), time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:  # up to four requests in flight at once
        results = list(pool.map(one, range(50)))
    TIMINGS["burst_total"] = [time.perf_counter() - start]
    TIMINGS["burst_request"] = [r[3] for r in results]
    for i, outcome, detail, _ in results:
        expected_ok = plan[i] in good
        assert (outcome == "ok") == expected_ok, (i, plan[i], detail)
        if expected_ok:
            assert detail == SHAPE
        else:
            assert "Status: 4" in detail, detail  # a 4xx naming the problem, never a crash
    assert sum(r[1] == "ok" for r in results) == sum(p in good for p in plan) == 26
    assert server["proc"].poll() is None
    assert MONAILabelClient(server["url"]).info()["models"]
