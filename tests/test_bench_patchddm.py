"""Smoke test of scripts/bench_patchddm_memory.py --quick: every configuration in its own subprocess, peak RSS
reported and compared, and a run over the memory limit reported as "does not fit" instead of failing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_patchddm_memory.py"


def run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", *args], capture_output=True,
                          text=True, encoding="utf-8", errors="replace", env=env, timeout=600)


@pytest.mark.slow
def test_quick_benchmark_reports_memory_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("--configs", "train_p64", "train_full", "infer_sw64", "--regions", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert report["network"]["in_channels"] == 10 and report["network"]["out_channels"] == 3
    assert all(r["status"] == "ok" for r in results.values()), results
    small, full = results["train_p64"], results["train_full"]
    assert small["spatial"] == [16, 16, 16] and full["spatial"] == [40, 48, 40]
    # a step on the whole 40x48x40 volume holds 30x the activations of a 16^3 patch: more memory, more time
    assert full["peak_rss_mb"] - full["setup_mb"] > 2 * (small["peak_rss_mb"] - small["setup_mb"])
    assert full["rss_vs_train_p64"] == pytest.approx(full["peak_rss_mb"] / small["peak_rss_mb"], abs=0.01)
    assert results["infer_sw64"]["roi"] == [16, 16, 16]
    assert "train_full" in proc.stdout and "RSS ratio" in proc.stdout


@pytest.mark.slow
def test_run_over_the_memory_limit_does_not_fit(tmp_path):
    """200 MB of address space beyond setup holds a 16^3 patch step (60-100 MB mapped) but not the full 40x48x40
    volume's (over 400 MB mapped): the first reports ok, the second "does not fit", and the run itself succeeds."""
    proc = run("--configs", "train_p64", "train_full", "--step-budget-mb", "200", "--out", str(tmp_path / "bench.json"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert results["train_p64"]["status"] == "ok", results
    assert results["train_full"]["status"] == "does not fit" and results["train_full"]["step_budget_mb"] == 200, results
    assert "does not fit" in proc.stdout
