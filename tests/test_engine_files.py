"""Hostile and damaged files at the engine: the one weights-only reader, partial files and a lagging export on resume.

Every bad file gives one :class:`InputError` line naming the file and what it is; nothing in a file ever runs.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil

import pytest
import torch

from meddiff3d.engine import DiffusionTrainer
from meddiff3d.engine.checkpoint import (
    CODEC_FORMAT,
    INFERENCE_FORMAT,
    read_checkpoint,
    read_file,
    remove_partial_files,
)
from meddiff3d.engine.selftest import blob_volumes
from meddiff3d.errors import InputError

torch.set_num_threads(1)


class Payload:
    """Unpickling this would create ``marker``: the proof that a file's code never runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _codec_like(path):
    torch.save({"format": CODEC_FORMAT, "weights": {"w": torch.zeros(2)}, "meta": {"kind": "kl"}}, path)
    return path


def _write(kind: str, path, marker: str):
    """A hostile or foreign file of ``kind`` at ``path``."""
    if kind == "missing":
        return path
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("model weights: see the README\n")
    elif kind == "truncated":
        whole = _codec_like(path.with_name("whole.pt")).read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "torch_code":
        torch.save({"format": CODEC_FORMAT, "weights": Payload(marker)}, path)
    elif kind == "pickle_code":
        path.write_bytes(pickle.dumps(Payload(marker)))
    elif kind == "pickle_plain":
        path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "state_dict":
        torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "diffusion":
        torch.save({"format": INFERENCE_FORMAT, "iteration": 3, "ema": {},
                    "meta": {"kind": "meddiff3d.latent_diffusion/1"}}, path)
    elif kind == "meta_list":
        torch.save({"format": CODEC_FORMAT, "weights": {}, "meta": [1, 2]}, path)
    return path


HOSTILE = [
    ("missing", "does not exist"),
    ("directory", "is a directory, expected a file"),
    ("empty", "cannot be read: the file is empty \\(0 bytes\\)"),
    ("text", "cannot be read: not a torch file \\(it starts with b'model weight"),
    ("truncated", "cannot be read: a truncated or corrupted torch file"),
    ("torch_code", ("holds Python code or objects other than tensors \\(io.open; refused: meddiff3d reads "
                    "weights only\\)")),
    ("pickle_code", "holds Python code or objects other than tensors \\(refused: meddiff3d reads weights only\\)"),
    ("pickle_plain", "a plain Python pickle, not a torch weights file"),
    ("state_dict", ("is not a meddiff3d file \\(a dict without a 'format' tag, e.g. a bare state dict; expected "
                    "a codec\\)")),
    ("tensor", "is not a meddiff3d file \\(it holds a Tensor; expected a codec\\)"),
    ("diffusion", "is a latent diffusion model file, not a codec"),
    ("meta_list", "is damaged: its meta is a list, not a mapping"),
]


@pytest.mark.parametrize("kind, message", HOSTILE, ids=[k for k, _ in HOSTILE])
def test_every_hostile_file_is_one_named_error_line(tmp_path, kind, message):
    marker = tmp_path / "code_ran"
    path = _write(kind, tmp_path / "autoencoder.pt", str(marker))
    with pytest.raises(InputError, match=message) as err:
        read_file(path, what="codec file", kind="codec")
    text = str(err.value)
    assert text.startswith(f"codec file {path} ") and "\n" not in text
    assert "weights_only" not in text and "trusted source" not in text  # never torch's advice to load unsafely
    assert not marker.exists()


def test_right_files_and_legacy_tags_are_read(tmp_path):
    data = read_file(_codec_like(tmp_path / "codec.pt"), what="codec file", kind="codec")
    assert data["format"] == CODEC_FORMAT
    legacy = tmp_path / "old.pt"  # written before the meddiff3d.<kind>/1 scheme
    torch.save({"format": INFERENCE_FORMAT, "iteration": 1, "ema": {}, "meta": {"kind": "latent_diffusion"}}, legacy)
    assert read_file(legacy, kind="latent_diffusion")["iteration"] == 1
    with pytest.raises(InputError, match="old.pt is a latent diffusion model file, not a segmentation diffusion"):
        read_file(legacy, kind="segmentation_diffusion")
    foreign = _write("state_dict", tmp_path / "zoo.pt", "")
    assert set(read_file(foreign, formats=None)) == {"conv.weight"}  # formats=None: any weights-only content


# ------------------------------------------------------------------------------------------- training faults
def _trainer(run_dir, max_iterations, **kwargs) -> DiffusionTrainer:
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(2, 1, 1))
    loss = lambda net, batch: (net(batch["image"]) - batch["image"]).pow(2).flatten(1).mean(1)
    return DiffusionTrainer(network, loss, blob_volumes(2, 8), run_dir=run_dir, max_iterations=max_iterations,
                            batch_size=2, device="cpu", progress=False, ema_decay=0.5, **kwargs)


def test_partial_files_of_a_killed_run_are_removed_on_resume(tmp_path, caplog):
    run = tmp_path / "run"
    _trainer(run, 1).run()
    planted = [run / "checkpoints" / ".last.pt.k7x_2abc.tmp.pt", run / ".inference.pt.q1w2e3r4.tmp.pt",
               run / ".meta.json.zz9y8x7w.tmp.json", run / "previews" / ".iter_00000001.png.abcdefgh.tmp.png"]
    for path in planted:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"PK\x03\x04 half a checkpoint")
    kept = [run / "notes.tmp.pt", run / ".hidden", run / "checkpoints" / ".last.pt.short.tmp.pt"]
    for path in kept:
        path.write_text("not ours")
    with caplog.at_level(logging.INFO, logger="meddiff3d.engine"):
        result = _trainer(run, 2).run()
    assert result.resumed_from == 1 and result.iteration == 2
    assert not any(path.exists() for path in planted)
    assert all(path.exists() for path in kept)  # only atomic_path's temporary names are touched
    assert "removed 4 partial file(s) left by an interrupted run: .inference.pt.q1w2e3r4.tmp.pt" in caplog.text
    assert "checkpoints/.last.pt.k7x_2abc.tmp.pt" in (run / "train.log").read_text()
    assert remove_partial_files(run, "checkpoints", "previews") == []


@pytest.mark.parametrize("export", ["stale", "missing", "damaged"])
def test_lagging_inference_export_is_rewritten_from_last_pt(tmp_path, export, caplog):
    run = tmp_path / "run"
    _trainer(run, 1).run()
    stale = tmp_path / "inference_at_1.pt"
    shutil.copyfile(run / "inference.pt", stale)
    _trainer(run, 2).run()
    if export == "stale":  # as a kill between writing last.pt and inference.pt leaves it
        shutil.copyfile(stale, run / "inference.pt")
    elif export == "missing":
        os.remove(run / "inference.pt")
    else:
        (run / "inference.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.INFO, logger="meddiff3d.engine"):
        result = _trainer(run, 2).run()  # nothing left to train: only the repair
    assert result.resumed_from == 2 and "rewritten from" in caplog.text
    last, inference = read_checkpoint(run / "checkpoints" / "last.pt"), read_file(run / "inference.pt")
    assert inference["iteration"] == last["iteration"] == 2
    assert all(torch.equal(inference["ema"][k], v) for k, v in last["ema"].items())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="meddiff3d.engine"):
        _trainer(run, 2).run()
    assert "rewritten from" not in caplog.text  # consistent: left alone


def test_damaged_or_foreign_last_pt_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    _trainer(run, 1).run()
    last = run / "checkpoints" / "last.pt"
    data = torch.load(last, weights_only=True)
    torch.save({k: v for k, v in data.items() if k not in ("optimizer", "rng")}, last)
    with pytest.raises(InputError, match="checkpoint .*last.pt is damaged or incomplete: no optimizer, rng"):
        _trainer(run, 2).run()
    shutil.copyfile(run / "inference.pt", last)
    with pytest.raises(InputError, match="last.pt is not a meddiff3d file \\(format 'meddiff3d.inference/1'"):
        _trainer(run, 2).run()
    torch.save(data, last)
    with pytest.raises(InputError, match="optimiser state does not fit SGD \\(it was saved by AdamW\\)"):
        _trainer(run, 2, optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9)).run()


def test_damaged_budget_file_restarts_the_clock(tmp_path, caplog):
    from meddiff3d.engine import WallClockBudget
    from meddiff3d.engine.budget import BUDGET_FILE

    run = tmp_path / "run"
    _trainer(run, 1, handlers=[WallClockBudget(minutes=10)]).run()
    (run / BUDGET_FILE).write_text('{"iteration": 1, "seconds": ')  # cut short
    budget = WallClockBudget(minutes=10)
    with caplog.at_level(logging.WARNING, logger="meddiff3d.engine"):
        assert _trainer(run, 2, handlers=[budget]).run().iteration == 2
    assert "training time restarts at 0" in caplog.text and budget.seconds < 600
