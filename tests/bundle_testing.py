"""What every bundle test needs: parse a bundle's configs, read its README's commands, run them in a copy of the
bundle folder (as a user who copied the folder elsewhere would), verify metadata."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "monai" / "meta_schema_20240725.json"


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

    def copy_to(self, folder) -> Path:
        """Copy the bundle folder into ``folder`` (created if needed) without the contents of ``models/`` but its
        README (the tests train or bring their own models) and without replacing a file already there (a test's
        models, an earlier run's data)."""
        folder = Path(folder)

        def copy(src: str, dst: str) -> None:
            if not os.path.exists(dst):
                shutil.copy2(src, dst)

        def ignore(directory: str, names: list[str]) -> list[str]:
            if Path(directory) == self.path / "models":
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
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        return subprocess.run(argv, cwd=root, capture_output=True, text=True, encoding="utf-8",
                              errors="replace", timeout=timeout, env=env)

    def verified_metadata(self) -> dict:
        """``configs/metadata.json`` after MONAI's ``verify_metadata`` against the schema (offline), as a dict."""
        if not SCHEMA.is_file():
            pytest.skip(f"MONAI metadata schema not found at {SCHEMA} (CI keeps ../shared beside the clone)")
        from monai.bundle import verify_metadata

        verify_metadata(meta_file=str(self.path / "configs" / "metadata.json"), filepath=str(SCHEMA))
        return json.loads((self.path / "configs" / "metadata.json").read_text())


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
