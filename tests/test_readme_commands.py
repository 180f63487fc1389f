"""The README's two commands stay true: CI runs the test one, this file runs the main one."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def make_recipe(target):
    out = subprocess.run(["make", "-n", "-W", "setup.cfg", target], cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith(".venv/bin/python -m ")
            and "pip install" not in line]


def test_readme_names_main_and_test_commands():
    assert readme_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_main_command_runs(tmp_path):
    (cmd,) = make_recipe("demo")
    argv = shlex.split(cmd)
    argv[0] = sys.executable
    # write into tmp_path instead of the repo: replace the --out value
    if "--out" in argv:
        argv[argv.index("--out") + 1] = str(tmp_path / "demo")
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    written = list((tmp_path / "demo").rglob("*.nii.gz"))
    assert written, "the main command wrote no NIfTI"
