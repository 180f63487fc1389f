"""A tiny segmentation diffusion model trained on patches for ~2 minutes: WT Dice bound, whole-volume vs
sliding-window agreement, time per case for N = 1 and N = 5; training input errors fail before anything is written.

Measured figures are printed (``pytest -s``) so the bundle README can quote them.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff3d.data.datalist import load_datalist
from meddiff3d.data.synthetic import write_cohort
from meddiff3d.errors import DatalistError
from meddiff3d.pipelines.seg_training import train_segmentation_diffusion
from meddiff3d.pipelines.segmentation import output_paths, segment

SHAPE, SPACING = (32, 48, 32), (5.0, 5.0, 5.0)
#: bound on the mean WT Dice over the 2 held-out cases (N = 5, DDIM 10 steps) after 150 iterations; measured 0.71
#: (cases 0.83, 0.59) with one torch thread, 0.64 (0.79, 0.49) with two (the float rounding differs)
WT_DICE_BOUND = 0.5
#: whole volume vs sliding window with windows of the training patch size (24^3, overlap 0.5, Gaussian blending),
#: same model, seeds and steps: bounds on the mean absolute difference of the probability maps and on the Dice between
#: the two WT masks. Measured on the vote-share probability: mean 0.009 / 0.007, max 0.77 / 0.52 (a few voxels where
#: the votes flip), WT agreement 0.96 / 0.93 (the difference comes from GroupNorm statistics computed per window and
#: from the receptive field at window borders)
MEAN_PROB_DIFF_BOUND = 0.05
WT_AGREEMENT_BOUND = 0.8


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # One thread: on the shared 2-core machines two threads were 4x slower under load (oversubscription).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("segdiff")
    datalist = write_cohort("brats", work / "cohort", n=10, seed=0, shape=SHAPE, source="procedural",
                            val_fraction=0.0, test_fraction=0.2, progress=False).datalist
    start = time.perf_counter()
    summary = train_segmentation_diffusion(
        datalist, work / "run", out=work / "model.pt", network="tiny_cpu", spacing=SPACING, shape=SHAPE,
        patch_size=(24, 24, 24), foreground_prob=0.7, prediction="v", batch_size=4, max_iterations=150, lr=2e-3,
        ema_decay=0.99, amp="none", device="cpu", checkpoint_every=1000, progress=False, log_every=50)
    print(f"\ntraining: {summary['iteration']} iterations in {time.perf_counter() - start:.1f} s")
    yield work, datalist, work / "model.pt"
    torch.set_num_threads(before)


def run(model, datalist, out, **kwargs):
    start = time.perf_counter()
    segment(model, datalist, section="test", output_dir=out, **{"steps": 10, "num_samples": 5, **kwargs},
            device="cpu", amp="none", progress=False)
    return (time.perf_counter() - start) / len(load_datalist(datalist, "test", check_images=False))


@pytest.mark.slow
def test_tiny_model_trained_on_patches_segments_held_out_cases(trained):
    work, datalist, model = trained
    seconds = {n: run(model, datalist, work / f"whole_n{n}", num_samples=n) for n in (1, 5)}
    scores = []
    for item in load_datalist(datalist, "test"):
        truth = np.asarray(nib.load(item["label"]).dataobj) > 0
        pred = np.asarray(nib.load(str(output_paths(work / "whole_n5", item["id"])["seg"])).dataobj) > 0
        scores.append(dice(truth, pred))
    print(f"WT Dice (N=5, DDIM 10): {[round(s, 3) for s in scores]}; seconds per case N=1 {seconds[1]:.1f}, "
          f"N=5 {seconds[5]:.1f}")
    assert len(scores) == 2 and np.mean(scores) >= WT_DICE_BOUND, scores


@pytest.mark.slow
def test_whole_volume_and_sliding_window_agree_on_a_model_trained_on_patches(trained):
    work, datalist, model = trained
    if not (work / "whole_n5").exists():
        run(model, datalist, work / "whole_n5")
    run(model, datalist, work / "window", roi_size=(24, 24, 24), overlap=0.5, sw_batch_size=8)
    for item in load_datalist(datalist, "test"):
        whole, window = output_paths(work / "whole_n5", item["id"]), output_paths(work / "window", item["id"])
        p_whole = np.asarray(nib.load(str(whole["prob"])).dataobj)
        p_window = np.asarray(nib.load(str(window["prob"])).dataobj)
        diff = np.abs(p_whole - p_window)
        agreement = dice(p_whole[..., 0] > 0.5, p_window[..., 0] > 0.5)
        print(f"{item['id']}: |prob difference| max {diff.max():.3f} mean {diff.mean():.4f}, "
              f"WT agreement (Dice) {agreement:.3f}")
        assert diff.mean() <= MEAN_PROB_DIFF_BOUND and agreement >= WT_AGREEMENT_BOUND
        info = json.loads(window["info"].read_text())
        assert info["inference"]["sliding_window"]["roi_size"] == [24, 24, 24]


def test_training_items_without_label_fail_before_anything_is_written(tmp_path):
    datalist = write_cohort("brats", tmp_path / "cohort", n=3, seed=0, shape=SHAPE, source="procedural",
                            val_fraction=0.0, test_fraction=0.0, progress=False).datalist
    doc = json.loads(Path(datalist).read_text())
    del doc["training"][1]["label"]
    Path(datalist).write_text(json.dumps(doc))
    with pytest.raises(DatalistError, match=r"training\[1\] \(id sub-0001\): no 'label' \(required\)") as err:
        train_segmentation_diffusion(datalist, tmp_path / "run", out=tmp_path / "model.pt", spacing=SPACING,
                                     shape=SHAPE, patch_size=(16, 16, 16), max_iterations=1, device="cpu",
                                     progress=False)
    assert str(datalist) in str(err.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "model.pt").exists()


# ------------------------------------------------------------------------------------------------ exact resume
REPO = Path(__file__).resolve().parents[1]
#: a segmentation diffusion run in a fresh process (one torch thread); argv: datalist, run_dir, sleep per step (s)
RESUME_CHILD = r"""
import sys, time
import torch
from meddiff3d.engine.trainer import DiffusionTrainer
from meddiff3d.pipelines.seg_training import train_segmentation_diffusion

torch.set_num_threads(1)
throttle, train_step = float(sys.argv[3]), DiffusionTrainer.train_step


def slow_step(self, *args, **kwargs):  # gives the test time to kill the run between two checkpoints
    time.sleep(throttle)
    return train_step(self, *args, **kwargs)


DiffusionTrainer.train_step = slow_step
train_segmentation_diffusion(sys.argv[1], sys.argv[2], out=sys.argv[2] + "/model.pt", network="tiny_cpu",
                             spacing=(10.0, 10.0, 10.0), shape=(16, 24, 16), patch_size=(8, 8, 8), foreground_prob=0.5,
                             batch_size=2, max_iterations=12, checkpoint_every=3, lr=1e-3, amp="none", device="cpu",
                             seed=5, progress=False)
"""


def _resume_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return 0


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigkilled_segmentation_diffusion_run_resumes_bit_identically(tmp_path):
    """Patches (foreground-biased, from the trainer's restored RNG), noise and timesteps resume exactly: a run killed
    between checkpoints and restarted ends with the model, EMA and optimiser state of an uninterrupted run."""
    datalist = write_cohort("brats", tmp_path / "cohort", n=3, seed=0, shape=(16, 24, 16), source="procedural",
                            val_fraction=0.0, test_fraction=0.0, progress=False).datalist
    command = [sys.executable, "-c", RESUME_CHILD, str(datalist)]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = subprocess.Popen([*command, str(whole), "0"], env=_resume_env(), cwd=REPO)
    victim = subprocess.Popen([*command, str(killed), "0.3"], env=_resume_env(), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 180
    while _iteration(last) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.45)  # mid-way between checkpoints 3 and 6
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = _iteration(last)
    assert 3 <= killed_at < 12, f"the run must be killed between checkpoints, last checkpoint at {killed_at}"

    subprocess.run([*command, str(killed), "0"], env=_resume_env(), cwd=REPO, check=True, timeout=300)
    assert reference.wait(timeout=300) == 0
    assert "resuming from" in (killed / "train.log").read_text()
    a, b = torch.load(whole / "checkpoints" / "last.pt", weights_only=True), torch.load(last, weights_only=True)
    assert a["iteration"] == b["iteration"] == 12
    for part in ("model", "ema", "optimizer"):
        _assert_same(a[part], b[part], part)
