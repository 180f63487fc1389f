import pytest
from monai.transforms import Compose, Lambda

from meddiff3d.errors import ImageError, find_input_error


def _bad(_):
    raise ImageError("x.nii.gz: contains NaN")


def test_input_error_found_through_monai_compose_wrapping():
    with pytest.raises(Exception) as info:
        Compose([Lambda(_bad)])({"image": 0})
    assert isinstance(info.value, RuntimeError)  # MONAI wraps it: the CLI must look behind the wrapper
    found = find_input_error(info.value)
    assert isinstance(found, ImageError) and "NaN" in str(found)


def test_no_input_error_in_chain():
    try:
        try:
            raise KeyError("k")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as err:
        assert find_input_error(err) is None


@pytest.mark.parametrize("edit, message", [
    ({"threshold": "high"}, "an entry has the wrong type"),
    ({"models": [1, 2]}, "an entry has the wrong type"),
    ({"settings": {"bogus": 1}}, "unknown detector settings \\['bogus'\\]"),
    ({"image": None, "threshold": None}, "an entry has the wrong type"),
])
def test_damaged_calibration_file_is_one_named_error(tmp_path, edit, message):
    """An edited or damaged calibration JSON: one InputError naming the file, never a TypeError / ValueError."""
    import json

    from meddiff3d.anomaly.calibration import CALIBRATION_FORMAT, load_calibration
    from meddiff3d.errors import InputError

    good = {"format": CALIBRATION_FORMAT, "settings": {}, "models": {}, "image": {}, "mask_thresholds": [0.5],
            "residual_stats": [{"mean": 0.0, "std": 1.0}], "threshold": 1.0, "target_fpr": 0.05,
            "calibration_fpr": 0.05, "volume_scores": {}}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({**good, **edit}))
    with pytest.raises(InputError, match=f"^anomaly calibration file {path}: {message}"):
        load_calibration(path)
