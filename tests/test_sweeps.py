"""Paired covariate sweeps (meddiff3d.evaluation.sweeps): the statistics on constructed answers, and the script end
to end on an untrained tiny pair."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from meddiff3d.evaluation.sweeps import base_covariates, sweep_statistics

ROOT = Path(__file__).resolve().parents[1]


def test_sweep_statistics_of_constructed_changes():
    requested = [[0.1, 0.3, 0.5, 0.7]] * 3
    half = [[0.2 + s, 0.3 + s, 0.4 + s, 0.5 + s] for s in (0.0, 0.1, -0.05)]  # each seed its own offset
    stats = sweep_statistics(requested, half)
    assert stats["slope"] == pytest.approx(0.5) and stats["r"] == pytest.approx(1.0) and stats["n_pairs"] == 9
    assert stats["slope_per_seed"] == pytest.approx([0.5, 0.5, 0.5])
    ignored = sweep_statistics(requested, [[0.4] * 4, [0.2] * 4, [0.6] * 4])  # offsets only: no response
    assert ignored["slope"] == 0.0 and ignored["r"] is None
    noisy = sweep_statistics(requested, [[0.1, 0.3, 0.5, 0.7], [0.1, 0.5, 0.3, 0.7], [0.1, 0.3, float("nan"), 0.9]])
    assert noisy["n_pairs"] == 8 and 0.5 < noisy["r"] < 1.0 and not math.isnan(noisy["slope"])
    with pytest.raises(ValueError):
        sweep_statistics([[0.1]], [[0.2]])


def test_base_covariates_are_the_training_medians():
    items = [{"covariates": {"sex": s, "age": a}} for s, a in ((1.0, 0.2), (1.0, 0.4), (0.0, 0.9))]
    assert base_covariates(items, ["sex", "age"]) == {"sex": 1.0, "age": 0.4}


@pytest.mark.slow
def test_sweep_script_end_to_end(tmp_path, monkeypatch, capsys):
    """Two values x two seeds on an untrained pair: the samples of one seed differ only by the swept covariate
    (their sidecars), the JSON holds the statistics, a bad sweep value is one error line."""
    import runpy

    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.pipelines.benchmark import untrained_pair

    torch.set_num_threads(1)
    codec, diffusion = untrained_pair(tmp_path / "models")
    datalist = write_cohort("healthy", tmp_path / "data", 8, shape=(32, 48, 32), source="procedural",
                            progress=False).datalist
    script = ROOT / "scripts" / "sweep_brain_ldm.py"
    out = tmp_path / "sweeps"
    argv = [str(script), "--codec", str(codec), "--diffusion", str(diffusion), "--datalist", str(datalist),
            "--out", str(out), "--sweep", "ventricular_volume=0.2,0.8", "--seeds", "0", "1", "--steps", "2",
            "--device", "cpu", "--amp", "none"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0, capsys.readouterr().err[-2000:]
    result = json.loads((out / "sweep_ventricular_volume.json").read_text())
    assert result["values"] == [0.2, 0.8] and result["seeds"] == [0, 1] and len(result["samples"]) == 4
    assert result["statistics"]["n_pairs"] == 2 and len(result["statistics"]["slope_per_seed"]) == 2
    sidecars = [json.loads(Path(s["file"]).with_suffix("").with_suffix(".json").read_text())
                for s in result["samples"]]
    assert [c["covariates"]["ventricular_volume"] for c in sidecars] == [0.2, 0.8, 0.2, 0.8]
    fixed = {k: v for k, v in sidecars[0]["covariates"].items() if k != "ventricular_volume"}
    assert all({k: c["covariates"][k] for k in fixed} == fixed for c in sidecars)
    assert "ventricular_volume: slope" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [*argv[:9], "--sweep", "age=0.2,0.8", "--device", "cpu", "--amp", "none"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 2 and "error: sweep covariate 'age'" in capsys.readouterr().err
