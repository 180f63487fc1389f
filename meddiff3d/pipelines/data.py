"""Datalists for the bundles: the synthetic healthy cohort, generated once and reused."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from meddiff3d.utils.io import save_json

__all__ = ["synthetic_datalist"]


def synthetic_datalist(out_dir: str | os.PathLike, kind: str = "healthy", n: int = 16, seed: int = 0,
                       shape: Sequence[int] = (160, 224, 160), progress: bool = True) -> str:
    """Path of ``OUT_DIR/datalist.json`` of a synthetic cohort (:func:`meddiff3d.data.synthetic.cohorts.write_cohort`),
    written on first use and reused while ``kind``, ``n``, ``seed`` and ``shape`` stay the same."""
    from meddiff3d.data.synthetic.cohorts import write_cohort

    out = Path(out_dir)
    stamp = out / "synthetic.json"
    request = {"kind": kind, "n": int(n), "seed": int(seed), "shape": [int(s) for s in shape]}
    datalist = out / "datalist.json"
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == request:
        return str(datalist)
    stamp.unlink(missing_ok=True)
    summary = write_cohort(kind, out, n=int(n), seed=int(seed), shape=tuple(request["shape"]), progress=progress)
    save_json(request, stamp)
    return str(summary.datalist)
