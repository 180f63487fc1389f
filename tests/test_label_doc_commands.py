"""docs/slicer.md's commands (and README's, the same lines) run as printed in the label environment: make the
studies folder, start ``meddiff3d label serve`` on port 8000 with the shipped bundles and demo weights, fill the
folder while it runs (``ln -s`` of BraTS-named cases), then start MONAI Label directly with the printed
``monailabel.main start_server`` line after ``--dry-run``. Each server must answer ``/info/`` with the three models
and list the linked images; one segmentation request on a linked case checks the BraTS sibling convention.

Each command runs by bash, unchanged, in a scratch folder laid out as a clone (``.venv-label`` linked), with
``DATA`` a folder of 4 small BraTS-named cases and ``HOME`` a scratch folder (the app folder goes to
``~/.cache/meddiff3d``). The port is the printed 8000: the test fails early, saying so, when something else holds it.

Runs in .venv-label (``make test-label``, part of ``make test``; MEDDIFF3D_REQUIRE_LABEL=1 turns a missing MONAI
Label into a failure); elsewhere the module is skipped.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

try:
    from monailabel.client import MONAILabelClient
except ImportError:
    if os.environ.get("MEDDIFF3D_REQUIRE_LABEL") == "1":
        raise
    pytest.skip("MONAI Label is not installed in this environment: this test runs in .venv-label "
                "(make label-venv; make test runs it)", allow_module_level=True)

from bundle_testing import run_as_printed, shell_env
from doc_commands import ROOT, label_commands, user_datasets, user_folder

from meddiff3d.data.images import read_image

pytestmark = [pytest.mark.label, pytest.mark.slow, pytest.mark.timeout(900)]

URL = "http://127.0.0.1:8000"
MODELS = {"brats_mri_segdiff", "brain_mri_anomaly_ldm", "brain_mri_ldm"}
SEQUENCES = ("t1", "t1ce", "t2", "flair")


def by_role(cmds: list[str]) -> dict[str, str]:
    """The slicer guide's commands by what they do; every command has one role."""
    roles = {}
    for command in cmds:
        if command.startswith("mkdir "):
            role = "mkdir"
        elif command.startswith("ln -s "):
            role = "link"
        elif " -m meddiff3d label serve " in command:
            role = "dry-run" if command.endswith(" --dry-run") else "serve"
        elif " -m monailabel.main start_server " in command:
            role = "start_server"
        else:
            role = f"unknown: {command}"
        assert role not in roles, (role, command)
        roles[role] = command
    assert set(roles) == {"mkdir", "link", "serve", "dry-run", "start_server"}, sorted(roles)
    return roles


def get_json(path: str):
    with urllib.request.urlopen(URL + path, timeout=10) as response:
        return json.loads(response.read())


class Server:
    """A printed server command run by bash in its own session, stopped (SIGTERM to that session) on exit."""

    def __init__(self, command: str, cwd: Path, env: dict, log: Path):
        self.log_path = log
        self.log = open(log, "w", encoding="utf-8")
        self.proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=shell_env(**env), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_until_up(self) -> dict:
        for _ in range(360):  # up in ~20 s here
            if self.proc.poll() is not None:
                break
            try:
                return get_json("/info/")
            except OSError:
                time.sleep(0.5)
        pytest.fail(f"the server did not answer /info/ (exit {self.proc.poll()}):\n{self.text()[-4000:]}")

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.log.close()


def datastore_images() -> set[str]:
    return set(get_json("/datastore/?output=all").get("objects", {}))


def wait_for_images(expected: set[str]) -> set[str]:
    for _ in range(120):  # MONAI Label's datastore watches the folder
        found = datastore_images()
        if found >= expected:
            return found
        time.sleep(0.5)
    return datastore_images()


def test_the_slicer_guide_runs_as_printed(tmp_path):
    roles = by_role(label_commands())
    bundles_before = sorted(p for p in (ROOT / "bundles").rglob("*") if "__pycache__" not in p.parts)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed server's TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.fail("port 8000, the one docs/slicer.md prints, is in use here: stop what holds it and re-run")
    data = user_datasets(tmp_path / "datasets", t1=False)
    clone = user_folder(tmp_path / "clone")
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    scratch.mkdir()
    env = {"DATA": str(data), "HOME": str(home), "TMPDIR": str(scratch)}
    cases = sorted(p.name for p in (data / "BraTS2021_Training_Data").iterdir())
    images = {f"{case}_{seq}" for case in cases for seq in SEQUENCES}
    times = {}

    def run(role):
        start = time.perf_counter()
        result = run_as_printed(roles[role], clone, **env)
        times[role] = round(time.perf_counter() - start, 1)
        assert result.returncode == 0, (roles[role], result.stderr[-3000:])
        return result

    run("mkdir")
    studies = data / "studies"
    assert studies.is_dir() and not list(studies.iterdir())
    start = time.perf_counter()
    with Server(roles["serve"], clone, env, tmp_path / "serve.log") as server:
        info = server.wait_until_up()
        times["serve: up"] = round(time.perf_counter() - start, 1)
        assert info["name"] == "meddiff3d" and set(info["models"]) == MODELS
        assert info["models"]["brats_mri_segdiff"]["type"] == "segmentation"
        printed = server.text().splitlines()[0]  # serve prints the MONAI Label command it becomes
        run("link")  # while the server runs: the guide's order
        linked = sorted(p.name for p in studies.iterdir() if p.is_symlink())  # beside MONAI Label's own .files
        assert linked == sorted(f"{i}.nii.gz" for i in images)
        assert wait_for_images(images) == images
        start = time.perf_counter()
        path, result = MONAILabelClient(URL, tmpdir=str(tmp_path)).infer(
            "brats_mri_segdiff", f"{cases[0]}_flair", {"num_samples": 1, "steps": 2})
        times["segdiff request"] = round(time.perf_counter() - start, 1)
        assert path.endswith(".seg.nrrd") and result["label_names"]
        labels, affine = read_image(path)  # on the case's own grid (4 mm)
        flair, flair_affine = read_image(data / "BraTS2021_Training_Data" / cases[0] / f"{cases[0]}_flair.nii.gz")
        assert labels.shape == flair.shape and np.allclose(affine, flair_affine, atol=1e-4)
        assert set(np.unique(labels)) <= {0, 1, 2, 4}

    dry = run("dry-run")
    expanded = roles["start_server"].replace("~", str(home)).replace("$DATA", str(data))
    argv = shlex.split(expanded)
    assert shlex.split(dry.stdout.strip().splitlines()[-1]) == shlex.split(printed)
    assert shlex.split(printed) == [str(clone / argv[0]), *argv[1:]], (printed, expanded)
    assert (home / ".cache" / "meddiff3d" / "label-app-8000" / "main.py").is_file()

    start = time.perf_counter()
    with Server(roles["start_server"], clone, env, tmp_path / "start_server.log") as server:
        info = server.wait_until_up()
        times["start_server: up"] = round(time.perf_counter() - start, 1)
        assert set(info["models"]) == MODELS and datastore_images() == images
    assert sorted(p for p in (ROOT / "bundles").rglob("*") if "__pycache__" not in p.parts) == bundles_before
    print("\nslicer guide times (s):", json.dumps(times))
