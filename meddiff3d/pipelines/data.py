"""Datalists for the bundles: the synthetic healthy cohort, generated once and reused."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from meddiff3d.utils.io import save_json

__all__ = ["synthetic_datalist"]


def synthetic_datalist(out_dir: str | os.PathLike, kind: str = "healthy", n: int = 16, seed: int = 0,
                       shape: Sequence[int] = (160, 224, 160), progress: bool = True, source: str | None = None,
                       val_fraction: float | None = None, test_fraction: float | None = None,
                       variant: str | None = None) -> str:
    """Path of ``OUT_DIR/datalist.json`` of a synthetic cohort (:func:`meddiff3d.data.synthetic.cohorts.write_cohort`),
    written on first use and reused while ``kind``, ``n``, ``seed``, ``shape`` (and ``source``, the split
    fractions and ``variant``, when given; ``None`` = the generator's defaults) and the generator's
    :data:`~meddiff3d.data.synthetic.cohorts.GENERATOR_VERSION` stay the same."""
    from meddiff3d.data.synthetic.cohorts import GENERATOR_VERSION, write_cohort

    out = Path(out_dir)
    stamp = out / "synthetic.json"
    request = {"kind": kind, "n": int(n), "seed": int(seed), "shape": [int(s) for s in shape],
               "generator_version": GENERATOR_VERSION}
    options = {"source": source, "val_fraction": val_fraction, "test_fraction": test_fraction, "variant": variant}
    request.update({k: v for k, v in options.items() if v is not None})
    datalist = out / "datalist.json"
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == request:
        return str(datalist)
    stamp.unlink(missing_ok=True)
    summary = write_cohort(kind, out, n=int(n), seed=int(seed), shape=tuple(request["shape"]), progress=progress,
                           **{k: v for k, v in options.items() if v is not None})
    save_json(request, stamp)
    return str(summary.datalist)
