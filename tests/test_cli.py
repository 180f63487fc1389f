"""The ``meddiff3d`` command as a user meets it (``--help``, ``--version``), and the packaging: what setup.cfg declares
is what the package imports."""

from __future__ import annotations

import ast
import configparser
import re
import subprocess
import sys
from pathlib import Path

import pytest

import meddiff3d
from meddiff3d.cli import SUBCOMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_describes_every_command_and_how_to_run_the_bundles(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse re-wraps the one-line helps
    for name, (_, help_text, long_text) in SUBCOMMANDS.items():
        assert help_text in text and " ".join(long_text.splitlines()[0].split()) in text, name
    for bundle in ("brain_mri_ldm", "brats_mri_segdiff", "brain_mri_anomaly_ldm"):
        assert bundle in text and (ROOT / "bundles" / bundle).is_dir()
    assert "python -m monai.bundle run" in text and "--version" in text


def test_each_command_help_starts_with_what_it_is_for(capsys):
    for name, (_, help_text, _) in SUBCOMMANDS.items():
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert help_text in " ".join(capsys.readouterr().out.split()), name


def test_version_is_the_package_version_everywhere():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "meddiff3d", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"meddiff3d {meddiff3d.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meddiff3d.__version__)
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: meddiff3d.__version__"  # one source of truth
    assert version("meddiff3d") == meddiff3d.__version__


def test_no_command_is_a_usage_error_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(name in err for name in SUBCOMMANDS)


# ------------------------------------------------------------------------------------------------ packaging
#: distribution name -> the module it provides, where they differ
MODULE_OF = {"pytorch-ignite": "ignite", "pillow": "PIL", "scikit-learn": "sklearn", "pyyaml": "yaml",
             "simpleitk": "SimpleITK"}
#: declared, used by MONAI rather than imported by meddiff3d: why each is needed
INDIRECT = {"pyyaml": "MONAI reads the bundles' YAML configs", "jsonschema": "MONAI checks bundle metadata",
            "itk": "MONAI's ITKReader (NRRD / MHA inputs through LoadImage)",
            "tensorboard": "torch.utils.tensorboard (training monitoring)"}


def _declared(section: str, key: str) -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [ln.strip() for ln in cfg[section][key].splitlines() if ln.strip() and not ln.startswith("#")]
    names = [re.match(r"[A-Za-z0-9_.-]+", ln).group(0).lower() for ln in lines]
    return {name: MODULE_OF.get(name, name.split("[")[0]) for name in names}


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "meddiff3d").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_every_imported_third_party_module_is_declared_and_every_declared_one_used():
    core = _declared("options", "install_requires")
    extras = {m for key in ("data", "label", "test") for m in _declared("options.extras_require", key).values()}
    imported = _imported_modules() - set(sys.stdlib_module_names) - {"meddiff3d"}
    label_only = {"monailabel", "fastapi", "torchvision"}  # the MONAI Label environment (extra "label")
    undeclared = imported - set(core.values()) - extras - label_only
    assert not undeclared, f"imported but not declared in setup.cfg: {sorted(undeclared)}"
    assert "sklearn" in core.values()  # evaluation.morphometry
    unused = {name for name, module in core.items() if module not in imported and name not in INDIRECT}
    assert not unused, f"declared in setup.cfg but imported nowhere: {sorted(unused)}"
    assert "torchio" not in core


# ------------------------------------------------------------------------------------------------ errors
def _raise(err):
    raise err


@pytest.mark.parametrize("err, code, line", [
    (OSError(28, "No space left on device", "/data/out/x.nii.gz"), 2,
     "meddiff3d datalist: error: No space left on device: /data/out/x.nii.gz"),
    (MemoryError(), 2, "meddiff3d datalist: error: out of memory"),
    (KeyboardInterrupt(), 130, "meddiff3d datalist: interrupted"),
])
def test_machine_errors_end_in_one_line(monkeypatch, capsys, err, code, line):
    import meddiff3d.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "run", lambda args: _raise(err))
    assert main(["datalist", "validate", "x.json"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_still_shows_its_traceback(monkeypatch):
    import meddiff3d.data.preprocess as preprocess

    monkeypatch.setattr(preprocess, "run", lambda args: {}["missing"])
    with pytest.raises(KeyError):
        main(["datalist", "validate", "x.json"])
