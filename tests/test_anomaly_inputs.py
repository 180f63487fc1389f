"""Bad inputs and settings stop calibration / detection before anything is written, naming the file or value."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from meddiff3d.anomaly import DetectorSettings, load_calibration
from meddiff3d.data.synthetic import write_cohort
from meddiff3d.errors import InputError
from meddiff3d.pipelines.anomaly import calibrate_anomaly, detect_anomalies
from meddiff3d.pipelines.benchmark import untrained_pair

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = dict(device="cpu", amp="none", progress=False)
FAST = {"start_steps": [300], "steps": 5, "resample": 1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("anomaly_inputs")
    summary = write_cohort("anomaly", root / "data", 8, seed=0, shape=(32, 48, 32), source="procedural",
                           progress=False)
    codec, diffusion = untrained_pair(root / "models")
    calibrate_anomaly(codec, diffusion, summary.datalist, root / "models" / "calibration.json", settings=FAST, **RUN)
    return root, summary.datalist, codec, diffusion


def bad_files(tmp_path, good):
    data = np.asarray(nib.load(str(good)).dataobj, dtype=np.float32)
    affine = nib.load(str(good)).affine
    files = {"missing": tmp_path / "missing.nii.gz"}
    files["4d"] = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], -1), affine), str(files["4d"]))
    files["nan"] = tmp_path / "nan.nii.gz"
    nan = data.copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, affine), str(files["nan"]))
    files["truncated"] = tmp_path / "truncated.nii.gz"
    raw = gzip.compress(gzip.decompress(good.read_bytes()))
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    return files


@pytest.mark.parametrize("kind, message", [("missing", "missing.nii.gz"), ("4d", "four_d.nii.gz"),
                                           ("nan", "non-finite"), ("truncated", "truncated.nii.gz")])
def test_bad_images_fail_before_any_output(setup, tmp_path, kind, message):
    root, datalist, codec, diffusion = setup
    good = datalist.parent / json.loads(datalist.read_text())["test"][0]["image"]
    files = bad_files(tmp_path, good)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message) as info:
        detect_anomalies(codec, diffusion, root / "models" / "calibration.json", [str(good), str(files[kind])], out,
                         **RUN)
    assert files[kind].name in str(info.value)
    assert not out.exists()


def test_bad_datalists_and_models_fail_clearly(setup, tmp_path):
    root, datalist, codec, diffusion = setup
    cal = root / "models" / "calibration.json"
    doc = json.loads(datalist.read_text())
    empty = datalist.parent / "empty.json"
    empty.write_text(json.dumps({**doc, "test": []}))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="empty.json.*section 'test' must be a non-empty list"):
        detect_anomalies(codec, diffusion, cal, empty, out, section="test", **RUN)  # asked for: an error
    with pytest.raises(InputError, match="no input images"):
        detect_anomalies(codec, diffusion, cal, [], out, **RUN)
    other_codec, other_diffusion = untrained_pair(tmp_path / "other", seed=1)
    with pytest.raises(InputError, match="is not the model the calibration .* was made with"):
        detect_anomalies(other_codec, other_diffusion, cal, datalist, out, **RUN)
    with pytest.raises(InputError, match="calibration file .*nope.json does not exist"):
        detect_anomalies(codec, diffusion, tmp_path / "nope.json", datalist, out, **RUN)
    assert not out.exists()
    with pytest.raises(InputError, match="unknown anomaly detection method 'magic'"):
        calibrate_anomaly(codec, diffusion, datalist, tmp_path / "c.json", settings={"method": "magic"}, **RUN)
    with pytest.raises(InputError, match="unknown detector settings \\['strength'\\]"):
        DetectorSettings.from_dict({"strength": 3})
    with pytest.raises(InputError, match="start step 1000 is outside"):
        calibrate_anomaly(codec, diffusion, datalist, tmp_path / "c.json", settings={"start_steps": [1000]}, **RUN)
    assert not (tmp_path / "c.json").exists()


def test_calibration_round_trip(setup):
    root, _, _, _ = setup
    path = root / "models" / "calibration.json"
    calibration = load_calibration(path)
    assert calibration.to_dict() == json.loads(path.read_text())
    assert calibration.settings.start_steps == [300] and calibration.calibration_fpr <= calibration.target_fpr
