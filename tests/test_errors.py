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
