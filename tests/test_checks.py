"""meddiff3d.checks: safe names from user input and the preflight checks (output folder, voxels, memory)."""

import os

import pytest

from meddiff3d import checks
from meddiff3d.checks import (MAX_VOXELS, MEMORY_LIMIT_ENV, available_memory, check_memory, check_output_dir,
                              check_voxels, raise_problems, safe_name)
from meddiff3d.errors import DatalistError, InputError


@pytest.mark.parametrize("name", ["sub-0001", "BraTS2021_00000", "a.b", "7", "ünïcode", "x" * 200])
def test_safe_names_pass_unchanged(name):
    assert safe_name("id", name) == name


@pytest.mark.parametrize("name, reason", [
    ("../x", "no path separators"), ("a/b", "no path separators"), ("a\\b", "no path separators"),
    ("..", "'..'"), (".", "'..'"), ("...", "'..'"), ("a..b", "'..'"), ("/etc/passwd", "no path separators"),
    ("C:evil", "no path separators"), ("a\x00b", "control characters"), ("a\nb", "control characters"),
    ("tab\there", "control characters"), ("", "empty"), ("   ", "empty"), ("x" * 201, "201 bytes"),
    ("é" * 101, "202 bytes"),
])
def test_unsafe_names_rejected_naming_the_value(name, reason):
    with pytest.raises(InputError) as info:
        safe_name("datalist item id", name)
    message = str(info.value)
    assert message.startswith("datalist item id ") and "is not a safe file name" in message and reason in message
    assert "\n" not in message  # control characters are shown escaped: one line


def test_safe_name_message_and_types():
    with pytest.raises(InputError, match=r"^datalist item id '\.\./x' is not a safe file name \(no path separators, "
                                         r"'\.\.', or control characters\)$"):
        safe_name("datalist item id", "../x")
    assert safe_name("id", 12) == "12"
    for value in (None, True, ["a"], {"a": 1}, 1.5):
        with pytest.raises(InputError, match="must be a text name"):
            safe_name("id", value)


def test_check_output_dir_creates_nothing_and_returns_the_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_dir("new/deeper") == tmp_path / "new" / "deeper"
    assert check_output_dir(tmp_path) == tmp_path
    assert list(tmp_path.iterdir()) == []  # no folder made, the probe file removed


def test_check_output_dir_rejects_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(InputError, match=r"output_dir .*taken is an existing file, not a folder"):
        check_output_dir(tmp_path / "taken")
    with pytest.raises(InputError, match=r"--out .*taken/sub lies inside .*taken, which is an existing file"):
        check_output_dir(tmp_path / "taken" / "sub", "--out")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(InputError, match="broken symbolic link"):
        check_output_dir(tmp_path / "dangling" / "x")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_dir_rejects_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="is not writable"):
            check_output_dir(locked / "out")
        with pytest.raises(InputError, match="is not writable"):
            check_output_dir(locked)
    finally:
        locked.chmod(0o700)


def test_check_voxels_caps_the_volume():
    assert check_voxels("shape", (2, 3, 4)) == 24
    assert check_voxels("shape", (512, 512, 512)) == MAX_VOXELS
    with pytest.raises(InputError, match=r"synth --shape \(10000, 10000, 10000\) is 1e\+12 voxels; at most "
                                         r"134217728 \(512\^3\)"):
        check_voxels("synth --shape", (10000, 10000, 10000))
    with pytest.raises(InputError, match="integer >= 1"):
        check_voxels("shape", (0, 3, 4))


def test_check_memory_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(MEMORY_LIMIT_ENV, raising=False)
    free = available_memory()
    assert free is None or free > 0
    assert check_memory("small", 1000) == 1000
    with pytest.raises(InputError, match=r"^x needs about 3\.0 GB of memory; the limit is 2\.0 GB$"):
        check_memory("x", 3e9, limit=2e9)
    monkeypatch.setattr(checks, "available_memory", lambda: int(21.3e9))
    with pytest.raises(InputError, match=r"^num_samples=100000 needs about 59\.0 GB of memory; 21\.3 GB are available "
                                         r"\(set MEDDIFF3D_MAX_MEMORY_GB to change the limit\)$"):
        check_memory("num_samples=100000", 59e9)
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "0.001")  # 1 MB
    with pytest.raises(InputError, match=r"job needs about 2\.0 MB of memory; the limit MEDDIFF3D_MAX_MEMORY_GB=0\.001 "
                                         r"allows 1\.0 MB"):
        check_memory("job", 2e6)
    assert check_memory("job", 5e5) == 500000
    monkeypatch.setenv(MEMORY_LIMIT_ENV, "lots")
    with pytest.raises(InputError, match="MEDDIFF3D_MAX_MEMORY_GB must be a finite number > 0, got 'lots'"):
        check_memory("job", 1)


def test_raise_problems_lists_them():
    raise_problems("x", [])
    with pytest.raises(InputError, match=r"^x: one$"):
        raise_problems("x", ["one"])
    with pytest.raises(DatalistError) as info:
        raise_problems("x", [f"p{i}" for i in range(25)], DatalistError)
    assert str(info.value).startswith("x: 25 problems:\n  p0\n") and str(info.value).endswith("... and 5 more")
