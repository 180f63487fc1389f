"""What :func:`meddiff3d.evaluation.generative.evaluate` reports besides its JSON: the per-sample CSV and a short
plain-text table of the headline numbers."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meddiff3d.utils.io import atomic_path

from .morphometry import MEASURED_COVARIATES

__all__ = ["summary_table", "write_samples_csv"]


def write_samples_csv(samples: Sequence[Any], names: Sequence[str], path: Path) -> None:
    measured = list(MEASURED_COVARIATES)
    header = (["file", "kind", "condition", "source_id", "seed"] + [f"requested_{n}" for n in names]
              + [f"measured_{n}" for n in measured] + ["brain_ml", "ventricular_ml", "measurement_valid",
                                                        "nn_train_id", "nn_similarity", "near_copy"])
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for s in samples:
            req = s.info.get("requested") or {}
            cal = s.info.get("calibrated") or {}
            writer.writerow([s.name, s.info["kind"], s.info.get("condition"), s.info.get("source_id"), s.info["seed"]]
                            + [req.get(n, "") for n in names] + [_round(cal.get(n)) for n in measured]
                            + [_round(s.raw.get("brain_ml")), _round(s.raw.get("ventricular_ml")),
                               s.raw.get("valid"), s.info.get("nn_train_id"), _round(s.info.get("nn_similarity")),
                               s.info.get("near_copy")])


def _round(value, digits: int = 4):
    return "" if value is None else round(float(value), digits)


def summary_table(result: Mapping[str, Any]) -> str:
    """A short plain-text table of the headline numbers of :func:`evaluate`'s result."""
    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    lines = [f"{'':34s}{'ventricular_volume':>22s}{'brain_volume':>22s}", f"{'':34s}{'r':>11s}{'MAE':>11s}"
             f"{'r':>11s}{'MAE':>11s}"]
    m, c = result["measurement"], result["conditioning"]
    rows = [("measurement ceiling (training)", m["ceiling_training_in_sample"]),
            ("measurement ceiling (held out)", m["ceiling_held_out"]),
            ("conditional: requested vs measured", c["conditional"]),
            ("unconditional (chance baseline)", {k: v["paired_with_requests"] for k, v in c["unconditional"].items()})]
    for label, row in rows:
        cells = "".join(f"{fmt(row[n]['r']):>11s}{fmt(row[n]['mae']):>11s}" for n in ("ventricular_volume",
                                                                                      "brain_volume"))
        lines.append(f"{label:34s}{cells}")
    d = result["diversity_ms_ssim"]
    lines.append("MS-SSIM (lower = more diverse): generated %s (within condition %s), training pairs %s" % (
        fmt(d["generated_all_pairs"]["mean"]), fmt(d["generated_within_condition"]["mean"]),
        fmt(d["training_pairs"]["mean"])))
    for key in ("fd_random_cnn", "fd_handcrafted"):
        fd = result["realism"][key]
        lines.append(f"FD {key[3:]:12s}: generated vs held-out %s, floor training vs held-out %s" % (
            fmt((fd["generated_vs_held_out"] or {}).get("fd"), ".2f"),
            fmt((fd["training_vs_held_out_floor"] or {}).get("fd"), ".2f")))
    mem = result["memorisation"]
    lines.append(f"memorisation: {mem['n_flagged']} near-copies (threshold NN corr {mem['threshold']:.4f}); sample NN "
                 f"corr mean {fmt(mem['sample_nn_similarity']['mean'], '.4f')}")
    return "\n".join(lines)
