"""What every bundle test needs: parse a bundle's configs, read its README's commands, run them in a copy of the
bundle folder (as a user who copied the folder elsewhere would) -- with test overrides (:meth:`Bundle.run`) or
exactly as printed (:func:`run_as_printed`, :func:`run_until_first_step`) --, check their outputs, verify metadata."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


def script_module(name: str):
    """The repository's ``scripts/<name>.py`` imported as a module (its functions and ``main`` for tests)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Bundle:
    """One bundle folder under ``bundles/``, as its tests see it."""

    def __init__(self, name: str) -> None:
        self.name, self.path = name, ROOT / "bundles" / name

    def parse(self, *files: str, **overrides):
        """A MONAI ``ConfigParser`` over ``files`` (bare names are the bundle's ``configs/``, paths are relative to the
        bundle folder, e.g. ``configs/presets/tiny_cpu.yaml``)."""
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config([str(self.path / "configs" / f) if "/" not in f else str(self.path / f) for f in files])
        parser.update(overrides)
        return parser

    def readme_commands(self, section: str) -> list[str]:
        """``python -m monai.bundle run ...`` lines of the bash blocks under a heading of ``docs/README.md``."""
        text = (self.path / "docs" / "README.md").read_text()
        body = re.search(rf"#+ {re.escape(section)}\n(.*?)(\n#+ |\Z)", text, re.S).group(1)
        blocks = re.findall(r"```bash\n(.*?)```", body, re.S)
        return [line.strip() for block in blocks for line in block.splitlines() if "monai.bundle run" in line]

    def copy_to(self, folder, models: bool = False) -> Path:
        """Copy the bundle folder into ``folder`` (created if needed) without replacing a file already there (a test's
        models, an earlier run's data), and without the contents of ``models/`` but its README (the tests train or
        bring their own models) unless ``models`` (the shipped weights, as a user's copy of the folder has them)."""
        folder = Path(folder)

        def copy(src: str, dst: str) -> None:
            if not os.path.exists(dst):
                shutil.copy2(src, dst)

        def ignore(directory: str, names: list[str]) -> list[str]:
            if Path(directory) == self.path / "models" and not models:
                return [n for n in names if n != "README.md"]
            skip = ("runs", "outputs", "data", "evaluation") if Path(directory) == self.path else ()
            return [n for n in names if n in skip or n == "__pycache__"]

        shutil.copytree(self.path, folder, dirs_exist_ok=True, copy_function=copy, ignore=ignore)
        return folder

    def run(self, cmd: str, bundle_root, *extra: str, timeout: int = 600) -> subprocess.CompletedProcess:
        """Run a README command in a subprocess (one thread) in ``bundle_root``, a copy of the bundle folder made by
        :meth:`copy_to` (the folder must stand alone: its configs, no ``../``), with ``--bundle_root`` set to it."""
        argv = shlex.split(cmd)
        assert argv[:4] == ["python", "-m", "monai.bundle", "run"], cmd
        root = self.copy_to(bundle_root)
        argv = [sys.executable, *argv[1:], "--bundle_root", str(root), *extra]
        return subprocess.run(argv, cwd=root, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, env=shell_env())

    def verified_metadata(self) -> dict:
        """``configs/metadata.json`` after MONAI's ``verify_metadata`` against the schema (offline), as a dict."""
        if not SCHEMA.is_file():
            pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (CI keeps ../shared beside the clone)")
        from monai.bundle import verify_metadata

        verify_metadata(meta_file=str(self.path / "configs" / "metadata.json"), filepath=str(SCHEMA))
        return json.loads((self.path / "configs" / "metadata.json").read_text())


def shell_env(**variables) -> dict[str, str]:
    """The environment a README command runs in: this interpreter's folder first on ``PATH`` (``python`` is the
    venv's), one thread (as :meth:`Bundle.run`: two threads on the 2 shared cores ran the commands 2-3x slower),
    warnings off, and ``variables`` (the README's placeholders, ``DATA=...``) as shell variables. A reader's shell has
    no enclosing make: the variables a parent ``make test`` exports (``MAKELEVEL``, ``MAKEFLAGS``, ...) are dropped, or a
    printed ``make`` command would run as a sub-make (printing "Entering directory", inheriting the parent's flags)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    inherited = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    return {**inherited, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            **{k: str(v) for k, v in variables.items()}}


def run_as_printed(command: str, cwd, timeout: int = 1800, **variables) -> subprocess.CompletedProcess:
    """``bash -c command`` in ``cwd``: a README's text, unchanged, with ``variables`` set (:func:`shell_env`)."""
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=shell_env(**variables), capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout)


class Stopped(NamedTuple):
    """What :func:`run_until_first_step` saw: the command's output (stdout and stderr), whether it was stopped after
    a completed training iteration (else it ended by itself or timed out), and its exit status."""
    output: str
    stopped: bool
    returncode: int


#: the training progress bar (meddiff3d.engine.monitoring) after at least one completed iteration
FIRST_STEP = re.compile(r"train:[^\r\n]*\|\s*[1-9]\d*/\d+")


def run_until_first_step(command: str, cwd, timeout: int = 1800, **variables) -> Stopped:
    """Start ``bash -c command`` in ``cwd`` in its own process group, wait until its training progress bar shows a
    completed iteration, then stop it as Ctrl-C does: SIGINT to the group (SIGKILL if it is still there a minute
    later). SIGINT is reset to its default in the child, so a test run from a shell that ignores it still stops it."""
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=shell_env(**variables), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        stopped, deadline = False, time.monotonic() + timeout

        def output() -> str:
            out.seek(0)
            return out.read().decode("utf-8", errors="replace")

        try:
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
                if FIRST_STEP.search(output()):
                    os.killpg(proc.pid, signal.SIGINT)
                    stopped = True
                    try:
                        proc.wait(timeout=60)
                    except subprocess.TimeoutExpired:
                        pass  # killed below
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return Stopped(output(), stopped, proc.returncode)


def check_generated(out_dir, n: int, shape, affine=None) -> list[Path]:
    """``out_dir`` holds ``n`` generated volumes (brain_mri_ldm's contract): float32 NIfTI of ``shape`` with a RAS
    affine (``affine`` if given), each with its PNG preview and JSON sidecar."""
    import nibabel as nib
    import numpy as np
    from PIL import Image

    niftis = sorted(Path(out_dir).glob("*.nii.gz"))
    assert len(niftis) == n, sorted(p.name for p in Path(out_dir).iterdir())
    for path in niftis:
        img = nib.load(str(path))
        assert img.shape == tuple(shape) and img.get_data_dtype() == np.float32
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and not np.allclose(img.affine, np.eye(4))
        if affine is not None:
            np.testing.assert_allclose(img.affine, affine, atol=1e-4)
        stem = str(path)[: -len(".nii.gz")]
        assert Image.open(stem + ".png").size[0] > shape[0]
        assert json.loads(Path(stem + ".json").read_text())["file"] == path.name
    return niftis


def check_segmented(out_dir, datalist, section: str | None = "test") -> None:
    """``out_dir`` holds brats_mri_segdiff's outputs for ``section``'s cases (``None``: every section's, the default
    of a run without --section): label map and WT/TC/ET vector images on each case's input grid."""
    import nibabel as nib
    import numpy as np

    doc = json.loads(Path(datalist).read_text())
    items = doc[section] if section else [it for s in ("training", "validation", "test") for it in doc.get(s) or []]
    assert sorted(p.name for p in Path(out_dir).iterdir() if p.is_dir()) == sorted(i["id"] for i in items)
    for item in items:
        ref = nib.load(str(Path(datalist).parent / item["image"][0]))
        seg = nib.load(str(Path(out_dir) / item["id"] / f"{item['id']}_seg.nii.gz"))
        prob = nib.load(str(Path(out_dir) / item["id"] / f"{item['id']}_prob.nii.gz"))
        assert seg.shape == ref.shape and prob.shape == (*ref.shape, 1, 3)  # a WT/TC/ET vector per voxel
        assert int(prob.header["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR
        np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
        assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 4}


def references(config) -> set[str]:
    """Every ``@id`` a parsed config's values name (in ``@id`` values and inside ``$`` expressions)."""
    found: set[str] = set()
    stack = [config]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            found.update(re.findall(r"@([A-Za-z_][\w#:]*)", value))
    return found


def assert_run_drives_the_components(parser, evaluator: str, keys=()) -> None:
    """An inference config whose ``run`` is its ``evaluator`` (a MONAI component of class ``evaluator``), whose
    ``initialize`` makes user errors one line, and whose top-level ``keys`` each reach a component."""
    from pydoc import locate

    assert parser["run"] == "$@evaluator.run()"
    assert parser["evaluator"]["_target_"] == evaluator and callable(locate(evaluator))
    assert [c["_target_"] for c in parser["initialize"]] == ["meddiff3d.pipelines.commands.report_user_errors",
                                                            "meddiff3d.pipelines.commands.check_command_line"]
    components = {k: v for k, v in parser.get().items() if isinstance(v, dict) and "_target_" in v}
    named = references(components) | references([parser[k] for k in parser.get() if k not in components])
    for key in keys:  # top-level keys, overridable on the command line, used by a component
        assert key in parser.get() and key in named, key
