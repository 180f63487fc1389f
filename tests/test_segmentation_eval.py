"""meddiff3d.evaluation.segmentation: Dice / HD95 / calibration / error capture on hand-built cases whose answers are
derived by hand, the prediction-folder contract and its errors, and the evaluation script."""

import csv
import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from meddiff3d.data.datalist import write_datalist
from meddiff3d.errors import InputError
from meddiff3d.evaluation.segmentation import (binary_entropy, calibration_error, dice_hd95, error_capture,
                                               evaluate_segmentation_dir, region_metrics)
from meddiff3d.utils.io import save_nifti, save_vector_nifti

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
SPACING = (1.0, 2.0, 3.0)
SHAPE = (24, 20, 16)
AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-10.0, 5.0, 2.5)


def box(shape, lo, hi, value=1, dtype=np.uint8):
    out = np.zeros(shape, dtype)
    out[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return out


# ------------------------------------------------------------------------------------------------- analytic cases
@pytest.mark.parametrize("k", [1, 3, 5])
def test_dice_of_cubes_offset_by_k_voxels(k):
    """Two n^3 cubes shifted by k voxels along x overlap in (n - k) n^2 voxels: Dice = (n - k) / n."""
    n = 10
    truth = box(SHAPE, (2, 2, 2), (2 + n, 2 + n, 2 + n), value=2)  # ED only: WT, not TC / ET
    pred = box(SHAPE, (2 + k, 2, 2), (2 + k + n, 2 + n, 2 + n), value=2)
    m = region_metrics(pred, truth, SPACING)
    assert m["WT_dice"] == pytest.approx((n - k) / n, abs=1e-6)
    assert m["WT_true_ml"] == pytest.approx(n**3 * np.prod(SPACING) / 1000)
    for region in ("TC", "ET"):  # both empty: a correct "no tumour"
        assert m[f"{region}_dice"] == 1.0 and m[f"{region}_hd95"] == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 5])
def test_hd95_of_parallel_sheets_uses_the_spacing(axis, k):
    """Two one-voxel-thick parallel sheets k voxels apart: every surface voxel of one is exactly k * spacing[axis] mm
    from the nearest of the other, so every percentile of the distances, HD95 included, is k * spacing[axis]."""
    lo, hi = [3, 3, 3], [13, 13, 13]
    lo[axis], hi[axis] = 4, 5
    truth = box(SHAPE, lo, hi, value=1)  # NCR: WT and TC
    lo[axis], hi[axis] = 4 + k, 5 + k
    pred = box(SHAPE, lo, hi, value=1)
    m = region_metrics(pred, truth, SPACING)
    for region in ("WT", "TC"):
        assert m[f"{region}_hd95"] == pytest.approx(k * SPACING[axis], rel=1e-6)
        assert m[f"{region}_dice"] == 0.0
    assert m["ET_hd95"] == 0.0 and m["ET_dice"] == 1.0


def test_identical_masks_and_nested_regions():
    label = box(SHAPE, (4, 4, 4), (14, 14, 12), value=2)
    label[6:12, 6:12, 6:10] = 1
    label[8:10, 8:10, 7:9] = 4
    m = region_metrics(label, label, SPACING)
    for region in ("WT", "TC", "ET"):
        assert m[f"{region}_dice"] == 1.0 and m[f"{region}_hd95"] == 0.0
    assert m["WT_true_ml"] > m["TC_true_ml"] > m["ET_true_ml"] > 0


def test_one_empty_mask_rules():
    truth = box(SHAPE, (4, 4, 4), (8, 8, 8), value=4)
    empty = np.zeros(SHAPE, np.uint8)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE, SPACING)))
    for pred, true in ((empty, truth), (truth, empty)):
        dice, hd = dice_hd95(pred > 0, true > 0, SPACING)
        assert dice == 0.0 and hd == pytest.approx(diagonal)
        assert math.isnan(dice_hd95(pred > 0, true > 0, SPACING, empty_hd95="nan")[1])
        assert dice_hd95(pred > 0, true > 0, SPACING, empty_hd95=373.13)[1] == 373.13
    with pytest.raises(ValueError, match="empty_hd95"):
        dice_hd95(empty > 0, truth > 0, SPACING, empty_hd95="huge")


def test_calibration_error_of_constructed_bins():
    """p = 0.25 on 100 voxels of which 50 are positive (gap 0.25), p = 0.75 on 100 voxels of which 75 are positive
    (gap 0): ECE = 100/200 * 0.25 = 0.125. A constant p = 0.9 on negatives: ECE = 0.9; p = 1 lands in the last bin."""
    prob = np.r_[np.full(100, 0.25), np.full(100, 0.75)]
    truth = np.r_[np.arange(100) < 50, np.arange(100) < 75]
    assert calibration_error(prob, truth) == pytest.approx(0.125)
    assert calibration_error(np.full(40, 0.9), np.zeros(40, bool)) == pytest.approx(0.9)
    assert calibration_error(np.ones(10), np.ones(10, bool)) == pytest.approx(0.0)
    assert calibration_error(np.r_[np.zeros(5), np.ones(5)], np.r_[np.zeros(5), np.ones(5)] > 0) == 0.0


def test_calibration_bins_are_closed_on_the_left():
    """p = 0.2 lies on a bin edge and belongs to [0.2, 0.3), not to the bin of p = 0.15: the two gaps (0.15 too high,
    0.2 too low) do not cancel, ECE = (100 * 0.15 + 100 * 0.2) / 200 = 0.175 (MONAI's CalibrationErrorMetric: 0.025)."""
    prob = np.r_[np.full(100, 0.15), np.full(100, 0.2)]
    truth = np.r_[np.zeros(100, bool), np.arange(100) < 40]
    assert calibration_error(prob, truth) == pytest.approx(0.175)


def test_probability_over_healthy_brain_is_the_mean_over_tumour_free_domain_voxels():
    """Tumour (label 2) in a 4^3 box, p = 0.1 on every other voxel and 0.9 in the tumour: prob_healthy = 0.1 for every
    region, also for TC and ET whose own masks are empty (the domain outside the tumour is the same); a domain
    that lies inside the tumour has no healthy voxel -> NaN."""
    label = box(SHAPE, (4, 4, 4), (8, 8, 8), value=2)
    prob = np.where((label > 0)[..., None], 0.9, 0.1) * np.ones(3)
    m = region_metrics(label, label, SPACING, prob=prob)
    assert [m[f"{r}_prob_healthy"] for r in ("WT", "TC", "ET")] == pytest.approx([0.1, 0.1, 0.1])
    assert math.isnan(region_metrics(label, label, SPACING, prob=prob, domain=label > 0)["WT_prob_healthy"])


def test_error_capture_of_constructed_maps():
    """1000 voxels, top 5 % = 50 voxels of uncertainty 1: 20 of the 40 errors and 30 correct voxels -> capture 0.5."""
    errors = np.zeros(1000, bool)
    errors[:40] = True
    u = np.zeros(1000)
    u[20:70] = 1.0  # errors 20..39 and correct voxels 40..69
    capture, fraction = error_capture(errors, u, 5.0)
    assert capture == pytest.approx(0.5) and fraction == pytest.approx(0.05)
    u[:40] = 2.0  # all errors most uncertain: 40 voxels of 2 + ties at 1 in the top 50 -> all 70 voxels >= 1 in
    capture, fraction = error_capture(errors, u, 5.0)
    assert capture == 1.0 and fraction == pytest.approx(0.07)
    assert error_capture(errors, np.zeros(1000), 5.0) == (0.0, 0.0)  # zero uncertainty never flags
    assert math.isnan(error_capture(np.zeros(1000, bool), u, 5.0)[0])  # no error to capture
    h = binary_entropy(np.array([0.0, 0.5, 1.0]))
    assert h[0] == 0.0 and h[2] == 0.0 and h[1] == pytest.approx(math.log(2))


# ------------------------------------------------------------------------------------------------ folder contract
def make_case(root: Path, case_id: str, truth: np.ndarray) -> dict:
    """Four sequences (brain = a box) and the label, on the anisotropic AFFINE grid."""
    brain = box(SHAPE, (1, 1, 1), (SHAPE[0] - 1, SHAPE[1] - 1, SHAPE[2] - 1), value=1, dtype=np.float32)
    images = [save_nifti(brain * (i + 1), AFFINE, root / "images" / f"{case_id}_{m}.nii.gz")
              for i, m in enumerate(("t1", "t1ce", "t2", "flair"))]
    label = save_nifti(truth, AFFINE, root / "labels" / f"{case_id}_seg.nii.gz", dtype=np.uint8)
    return {"id": case_id, "image": images, "label": label}


def write_prediction(pred_dir: Path, case_id: str, seg, prob=None, variance=None, affine=AFFINE, vector=False):
    """The prediction files; region maps channel-last (X, Y, Z, 3), or as NIfTI vectors (X, Y, Z, 1, 3) as the
    segmentation pipeline writes them (``vector``)."""
    folder = pred_dir / case_id
    save_nifti(seg, affine, folder / f"{case_id}_seg.nii.gz", dtype=np.uint8)
    for suffix, maps in (("prob", prob), ("variance", variance)):
        if maps is None:
            continue
        path = folder / f"{case_id}_{suffix}.nii.gz"
        if vector:
            save_vector_nifti(np.moveaxis(maps, -1, 0), affine, path, names=["WT", "TC", "ET"][:maps.shape[-1]])
        else:
            save_nifti(maps, affine, path)


@pytest.fixture
def dataset(tmp_path):
    truths = {"c0": box(SHAPE, (4, 4, 4), (14, 14, 12), value=2), "c1": box(SHAPE, (6, 5, 3), (16, 15, 13), value=4)}
    items = [make_case(tmp_path / "data", cid, t) for cid, t in truths.items()]
    datalist = write_datalist(tmp_path / "data" / "datalist.json", {"test": items}, modalities=["t1", "t1ce", "t2",
                              "flair"], label_convention="brats2021")
    return datalist, truths


def test_directory_evaluation_writes_csv_and_json(dataset, tmp_path):
    datalist, truths = dataset
    pred_dir = tmp_path / "pred"
    shifted = {cid: np.roll(t, 2, axis=0) for cid, t in truths.items()}  # shift by 2 voxels: Dice (10 - 2) / 10
    for cid, seg in shifted.items():
        prob = np.stack([(seg > 0) * 0.9, np.isin(seg, (1, 4)) * 0.9, (seg == 4) * 0.9], axis=-1) + 0.05
        variance = np.stack([(seg != t) * 1.0 for t in (truths[cid],) * 3], axis=-1)  # flags exactly the errors
        write_prediction(pred_dir, cid, seg, prob.astype(np.float32), variance.astype(np.float32))
    result = evaluate_segmentation_dir(pred_dir, datalist, "test", tmp_path / "out" / "cases.csv",
                                       tmp_path / "out" / "summary.json")
    rows = {r["id"]: r for r in result["cases"]}
    assert rows["c0"]["WT_dice"] == pytest.approx(0.8) and rows["c1"]["ET_dice"] == pytest.approx(0.8)
    assert rows["c0"]["TC_dice"] == 1.0  # both empty
    assert rows["c0"]["WT_hd95"] == pytest.approx(2 * SPACING[0])  # the x faces move by 2 voxels of 1 mm
    # the variance map is 1 exactly on the 2 * 2 * 10 * 8 = 320 error voxels of c0: more than the top 5 % of the
    # 22 * 18 * 14 brain voxels (278), but ties at the threshold are included, so all errors are flagged
    assert rows["c0"]["WT_err_top5_variance"] == 1.0
    assert rows["c0"]["WT_err_top5_variance_frac"] == pytest.approx(320 / (22 * 18 * 14))
    assert 0 < rows["c0"]["WT_ece"] < 0.2 and "WT_err_top5_pentropy" in rows["c0"]
    assert result["summary"]["WT_dice"]["mean"] == pytest.approx(0.8)
    assert result["summary"]["ET_dice"]["n"] == 2
    with open(tmp_path / "out" / "cases.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == ["c0", "c1"] and float(table[1]["ET_dice"]) == pytest.approx(0.8)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["summary"]["WT_hd95"]["median"] == pytest.approx(result["summary"]["WT_hd95"]["median"])
    assert summary["settings"]["empty_hd95"] == "diagonal"


def test_vector_maps_score_as_channel_last_ones_and_the_summary_is_logged(dataset, tmp_path, caplog):
    datalist, truths = dataset
    results = {}
    for vector in (False, True):
        pred_dir = tmp_path / f"pred_{vector}"
        for cid, truth in truths.items():
            seg = np.roll(truth, 2, axis=0)
            prob = np.stack([(seg > 0) * 0.9, np.isin(seg, (1, 4)) * 0.9, (seg == 4) * 0.9], axis=-1) + 0.05
            variance = np.stack([(seg != truth) * 1.0] * 3, axis=-1)
            write_prediction(pred_dir, cid, seg, prob.astype(np.float32), variance.astype(np.float32), vector=vector)
        with caplog.at_level("INFO", logger="meddiff3d.evaluation"):
            results[vector] = evaluate_segmentation_dir(pred_dir, datalist, "test", tmp_path / f"{vector}.csv",
                                                        tmp_path / f"{vector}.json")
    same = [json.dumps(results[v]["cases"], sort_keys=True) for v in (False, True)]  # NaN-aware comparison
    assert same[0] == same[1] and "WT_ece" in results[True]["cases"][0]
    logged = [r.getMessage() for r in caplog.records if "segmentation evaluation" in r.getMessage()]
    assert len(logged) == 2 and "WT_dice 0.800" in logged[1] and str(tmp_path / "True.json") in logged[1]
    write_prediction(tmp_path / "bad", "c0", truths["c0"], np.zeros((*SHAPE, 2), np.float32), vector=True)
    write_prediction(tmp_path / "bad", "c1", truths["c1"])
    with pytest.raises(InputError, match=r"c0_prob.nii.gz: shape"):
        evaluate_segmentation_dir(tmp_path / "bad", datalist, "test")


@pytest.mark.parametrize("problem, message", [
    ("missing", "c1_seg.nii.gz: prediction"),
    ("shape", "c1_seg.nii.gz: shape"),
    ("affine", "c1_seg.nii.gz: affine differs"),
    ("labels", "c1_seg.nii.gz: label values [3]"),
    ("prob_axis", "c1_prob.nii.gz: shape"),
    ("prob_range", "c1_prob.nii.gz: probabilities outside"),
    ("variance", "c1_variance.nii.gz: negative"),
])
def test_contract_errors_name_the_file(dataset, tmp_path, problem, message):
    datalist, truths = dataset
    pred_dir = tmp_path / "pred"
    write_prediction(pred_dir, "c0", truths["c0"])
    seg, prob, variance, affine = truths["c1"].copy(), None, None, AFFINE
    if problem == "shape":
        seg = seg[:-1]
    elif problem == "affine":
        affine = AFFINE.copy()
        affine[0, 3] += 0.5
    elif problem == "labels":
        seg[seg == 4] = 3  # brats2023 ET in a brats2021 datalist
    elif problem == "prob_axis":
        prob = np.zeros((*SHAPE, 4), np.float32)
    elif problem == "prob_range":
        prob = np.full((*SHAPE, 3), 1.5, np.float32)
    elif problem == "variance":
        variance = np.full((*SHAPE, 3), -1.0, np.float32)
    if problem != "missing":
        write_prediction(pred_dir, "c1", seg, prob, variance, affine)
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        evaluate_segmentation_dir(pred_dir, datalist, "test")


def test_script_compares_two_folders_and_fails_cleanly(dataset, tmp_path, capsys):
    datalist, truths = dataset
    for name, shift in (("diffusion", 0), ("baseline", 3)):
        for cid, t in truths.items():
            write_prediction(tmp_path / name, cid, np.roll(t, shift, axis=1))
    main = runpy.run_path(str(REPO / "scripts" / "evaluate_brats_segdiff.py"))["main"]
    code = main(["--compare", f"diffusion={tmp_path / 'diffusion'}", f"baseline={tmp_path / 'baseline'}",
                 "--datalist", str(datalist), "--out", str(tmp_path / "cmp")])
    out = capsys.readouterr().out
    assert code == 0
    line = next(l for l in out.splitlines() if l.startswith("WT_dice"))
    assert line.split()[1:] == ["1", "0.7"]  # shift of 3 voxels along y of a 10-voxel box: Dice 0.7
    assert (tmp_path / "cmp" / "baseline" / "cases.csv").is_file()
    assert (tmp_path / "cmp" / "diffusion" / "summary.json").is_file()
    code = main(["--pred", str(tmp_path / "nowhere"), "--datalist", str(datalist), "--out", str(tmp_path / "x")])
    assert code == 2 and "nowhere" in capsys.readouterr().err
