"""docs/own_data.md's example, run as printed in a fresh folder: every command succeeds and every output the guide
names is there (nothing is written into the bundles).

Each command runs by bash, unchanged, in a temporary folder laid out as the clone (``.venv`` and ``scripts/`` linked:
tests/doc_commands.py ``user_folder``), so that the outputs land there and not in the repository."""

from __future__ import annotations

import json
import re

import nibabel as nib
import pytest

from bundle_testing import ROOT, run_as_printed
from doc_commands import user_folder

GUIDE = ROOT / "docs" / "own_data.md"


def guide_commands() -> list[str]:
    block = re.search(r"## The example, in order.*?```bash\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_guide_names_the_task_commands():
    commands = guide_commands()
    for task in ("segment", "detect", "calibrate", "generate"):
        assert any(f"-m meddiff3d {task} " in c for c in commands), task
    assert all(c.startswith(".venv/bin/python ") for c in commands)


@pytest.mark.slow
def test_the_guide_runs_as_printed(tmp_path):
    bundles_before = sorted(p for p in (ROOT / "bundles").rglob("*") if "__pycache__" not in p.parts)
    user_folder(tmp_path)
    for command in guide_commands():
        result = run_as_printed(command, tmp_path, timeout=1200)
        assert result.returncode == 0, (command, result.stderr[-3000:])
    out = tmp_path / "outputs"
    cases = sorted(p.name for p in (tmp_path / "my_data" / "brats").iterdir())
    assert len(cases) == 2 and (tmp_path / "my_data" / "brats.json").is_file()
    for case in cases:
        for suffix in ("seg.nii.gz", "prob.nii.gz", "variance.nii.gz", "entropy.nii.gz", "preview.png", "segdiff.json"):
            assert (out / "segmentation" / case / f"{case}_{suffix}").is_file(), (case, suffix)
        seg = nib.load(out / "segmentation" / case / f"{case}_seg.nii.gz")
        t1 = nib.load(tmp_path / "my_data" / "brats" / case / f"{case}_t1.nii.gz")
        assert seg.shape == t1.shape[:3] and abs(seg.affine - t1.affine).max() < 1e-3
    for folder in ("anomaly", "anomaly_own"):
        summary = json.loads((out / folder / "summary.json").read_text())
        assert len(summary["cases"]) == 2
        for case in summary["cases"]:
            for suffix in ("_healed.nii.gz", "_anomaly_map.nii.gz", "_mask.nii.gz", "_preview.png"):
                assert (out / folder / f"{case['id']}{suffix}").is_file(), (folder, case["id"], suffix)
    calibration = out / "calibration" / "calibration.json"
    assert calibration.is_file() and (out / "calibration" / "calibration_autoencoder.json").is_file()
    own = json.loads((out / "anomaly_own" / "summary.json").read_text())
    assert own["calibration"].endswith("outputs/calibration/calibration.json")
    for seed in (0, 1):
        for suffix in (".nii.gz", ".png", ".json"):
            assert (out / "generation" / f"sample_seed{seed}{suffix}").is_file()
    bundles_after = sorted(p for p in (ROOT / "bundles").rglob("*") if "__pycache__" not in p.parts)
    assert bundles_after == bundles_before


def test_the_readme_task_commands_are_the_guides():
    """The README's task-command lines are lines of the guide's example (so the slow test above runs them)."""
    readme = (ROOT / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if re.match(r"\.venv/bin/python -m meddiff3d (segment|detect|"
                                                                   r"calibrate|generate) ", ln.strip())]
    assert len(lines) == 4 and set(lines) <= set(guide_commands())
