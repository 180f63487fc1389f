"""The real MONAI Label server on 127.0.0.1, driven by ``monailabel.client.MONAILabelClient``: the three bundles
(tiny untrained models, 32x48x32) answer with files on the input's grid, bad requests get a clear 4xx while the server
stays up, and a burst of 50 mixed requests (some bad, some concurrent) leaves every good one answered.

Runs in the label environment (``make label-venv``; ``make test`` runs it there with MEDDIFF3D_REQUIRE_LABEL=1, so a
missing MONAI Label fails instead of skipping). In an environment without MONAI Label the module is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("label")
    t0 = time.perf_counter()
    bundles = build_bundles(base)
    data = build_studies(base)
    port = free_port()
    log = open(base / "server.log", "w", encoding="utf-8")
    cmd = [sys.executable, "-m", "meddiff3d", "label", "serve", "--studies", str(data["studies"]), "--port",
           str(port), "--app-dir", str(base / "app"),
           "--bundles", *[f"{name}={path}" for name, path in bundles.items()]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
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
                            + (base / "server.log").read_text(encoding="utf-8", errors="replace")[-4000:])
            time.sleep(1)
    TIMINGS["setup_s"] = [time.perf_counter() - t0]
    yield {"url": url, "proc": proc, "base": base, **data}
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
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
    ("segdiff", "", {}, None, 500, "Neither Image nor File"),
    ("segdiff", "nosuchimage", {}, None, 404, "no image 'nosuchimage' in the datastore"),
    ("segdiff", "caseB_flair", FAST_SEG, None, 422, "3 of the 4 BraTS sequences"),
    ("segdiff", "", FAST_SEG, "three", 422, "has 3 channel(s)"),
    ("segdiff", "brain", FAST_SEG, None, 422, "does not say which BraTS case"),
    ("segdiff", "caseA_t1", {"steps": -2}, None, 422, "'steps' must be >= 1"),
    ("segdiff", "caseA_t1", {"result": "everything"}, None, 422, "'result' must be one of"),
    ("anomaly", "brain", {"result": "mask", "extra": 1, "result_extension": ".nrrd"}, None, 200, ""),
    ("generation", "brain", {"covariates": "age=7"}, None, 422, "age=7 is outside [0, 1]"),
    ("generation", "brain", {"covariates": "shoe_size=0.5", "steps": 2}, None, 422, "shoe_size"),
    ("generation", "brain", {"sampler": "fastest"}, None, 422, "'sampler' must be one of"),
])
def test_bad_requests_get_a_clear_error_and_the_server_stays_up(server, model, image_id, params, upload, status,
                                                                message):
    file = server[upload] if upload else None
    if status == 200:  # unknown extra keys belong to MONAI Label / the client and are not errors
        infer(server, model, image_id, params, file)
    else:
        text = error_of(server, model, image_id, params, file)
        assert f"Status: {status}" in text and message in text, text
    assert server["proc"].poll() is None
    assert "segdiff" in MONAILabelClient(server["url"]).info()["models"]


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
