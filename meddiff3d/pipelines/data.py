"""Datalists for the bundles: the synthetic cohorts (3D, and axial slices of one as a 2D datalist), generated once and
reused."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from meddiff3d.utils.io import save_json

__all__ = ["synthetic_datalist", "synthetic_slice_datalist"]


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


def synthetic_slice_datalist(out_dir: str | os.PathLike, n: int = 120, seed: int = 0,
                             volume_shape: Sequence[int] = (80, 112, 80), size: Sequence[int] = (64, 64),
                             slices: int = 12, band: Sequence[float] = (0.3, 0.75), variant: str | None = "varied",
                             val_fraction: float | None = 0.1, test_fraction: float | None = 0.1,
                             progress: bool = True) -> str:
    """Path of ``OUT_DIR/datalist.json``: a 2D datalist of ``slices`` axial slices per subject
    (:func:`meddiff3d.data.slices.slice_datalist`, ``size`` pixels, classes by level) of a synthetic healthy cohort of
    ``n`` subjects at ``volume_shape`` (written to ``OUT_DIR/volumes`` by :func:`synthetic_datalist`; its split is
    kept). Both are written on first use and reused while every setting stays the same."""
    from meddiff3d.data.slices import slice_datalist

    out = Path(out_dir)
    volumes = synthetic_datalist(out / "volumes", "healthy", n, seed, volume_shape, progress=progress,
                                 val_fraction=val_fraction, test_fraction=test_fraction, variant=variant)
    stamp = out / "slices.json"
    request = {"volumes": json.loads((out / "volumes" / "synthetic.json").read_text()),
               "size": [int(s) for s in size], "slices": int(slices), "band": [float(b) for b in band]}
    datalist = out / "datalist.json"
    if datalist.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == request:
        return str(datalist)
    stamp.unlink(missing_ok=True)
    written = slice_datalist(volumes, out, size, slices, band, progress=progress)
    save_json(request, stamp)
    return str(written)
