"""The one dataset layout and datalist format of meddiff3d.

Layout of a dataset folder (what the synthetic generators and the conversion scripts write)::

    DATASET/
      datalist.json
      images/<id>_<modality>.nii.gz     one file per modality (or a DICOM series folder, or .nrrd)
      labels/<id>_seg.nii.gz            optional label map / ground-truth mask

Datalist JSON (paths are relative to the folder holding the JSON, or absolute)::

    {
      "name": "synthetic-brats",
      "description": "...",
      "modalities": ["t1", "t1ce", "t2", "flair"],        # order of the image channels; length = channels
      "covariates": {"age": {"min": 40, "max": 90, "unit": "years"}, ...},   # allowed covariate names (+ scaling)
      "labels": {"0": "background", "1": "NCR", "2": "ED", "4": "ET"},       # optional, for label maps
      "label_convention": "brats2021",                    # optional: brats2021 (1/2/4) or brats2023 (1/2/3)
      "training":   [ITEM, ...],
      "validation": [ITEM, ...],
      "test":       [ITEM, ...]
    }

    ITEM = {
      "id": "sub-0000",
      "image": "images/sub-0000_t1.nii.gz"  or  ["images/sub-0000_t1.nii.gz", ...]   # one per modality, in order
      "label": "labels/sub-0000_seg.nii.gz",              # optional
      "covariates": {"age": 0.41, "sex": 1.0, ...},       # optional, values scaled to [0, 1]
      ... any further keys (e.g. "lesion_kind") are kept as they are
    }

Covariate values in items are the model inputs, scaled to [0, 1]; the top-level ``covariates`` block documents the
scaling (``value = (raw - min) / (max - min)``) so raw values can be recovered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from meddiff3d.utils.io import save_json

SECTIONS = ("training", "validation", "test")


def write_datalist(path: str | os.PathLike, sections: Mapping[str, Sequence[Mapping[str, Any]]], **meta: Any) -> Path:
    """Write a datalist JSON atomically; item paths are made relative to the JSON's folder where possible.

    ``sections`` maps section names (``training``/``validation``/``test``) to item lists; ``meta`` holds the
    top-level keys (``name``, ``description``, ``modalities``, ``covariates``, ``labels``, ...).
    """
    path = Path(path)
    root = path.parent.resolve()
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown datalist sections {sorted(unknown)}; expected {list(SECTIONS)}")

    def rel(p):
        p = Path(p)
        try:
            return p.resolve().relative_to(root).as_posix()
        except ValueError:
            return str(p)

    def fix(item):
        out = dict(item)
        for key in ("image", "label"):
            if key in out and out[key] is not None:
                out[key] = [rel(p) for p in out[key]] if isinstance(out[key], (list, tuple)) else rel(out[key])
        return out

    doc = dict(meta)
    for name in SECTIONS:
        if name in sections:
            doc[name] = [fix(item) for item in sections[name]]
    return save_json(doc, path)
