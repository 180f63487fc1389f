"""Anomaly detection with a tiny healthy-brain model pair (tests/anomaly_models.py, trained once per session).

Stated bounds, on the 3 tumour cases of the tiny cohort's test split (32x48x32, 5 mm), detector
``anomaly_models.DETECTOR`` (latent inpainting from t = 250 and 400, 20-step schedule, RePaint resampling 2):

* the mean residual ``|x - healed|`` inside the lesions is >= 2x the mean over the rest of the brain, and the voxel
  AUROC of the anomaly map is >= 0.8 (measured on 1 thread: ratio 2.59, AUROC 0.897; baseline autoencoder 0.83);
* the diffusion detector's pooled tumour AUPRC beats the autoencoder baseline's (measured 0.58 vs 0.39);
* healing leaves the decoded volume (vs the plain autoencoder reconstruction) nearly unchanged more than one latent
  cell (4 voxels) away from the heal mask: mean change <= 0.015 and 99th percentile <= 0.06 on [0, 1] intensities
  (measured 0.007 / 0.035, max 0.059), against a mean change of 0.05 inside the mask. The known latents are kept
  exactly; the residual change comes from the decoder's receptive field and GroupNorm's whole-volume statistics.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from anomaly_models import DETECTOR, tiny_anomaly_models
from meddiff3d.anomaly import DetectorSettings, heal, load_anomaly_models, load_calibration
from meddiff3d.anomaly.healing import healing_steps
from meddiff3d.data.datalist import load_datalist
from meddiff3d.evaluation.anomaly import evaluate_anomaly
from meddiff3d.evaluation.anomaly_metrics import roc_auc
from meddiff3d.pipelines.anomaly import Detector, calibrate_anomaly, detect_anomalies
from meddiff3d.utils.io import PREVIEW_INFO_KEY

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
RUN = dict(device="cpu", amp="none", progress=False)
TOLERANCE_MEAN, TOLERANCE_P99 = 0.015, 0.06  # change of the decoded volume more than one latent cell from the mask


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_anomaly_models(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def calibrated(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("anomaly_calibration")
    summary = calibrate_anomaly(models["codec"], models["diffusion"], models["datalist"], out / "calibration.json",
                                settings=DETECTOR, baseline_out=out / "calibration_autoencoder.json", **RUN)
    return out, summary


def tumour_items(models):
    return [it for it in load_datalist(models["datalist"], "test") if it["lesion_kind"] == "tumour"]


def test_lesions_score_higher_than_the_rest_of_the_brain(models, calibrated):
    out, _ = calibrated
    calibration = load_calibration(out / "calibration.json")
    loaded = load_anomaly_models(models["codec"], models["diffusion"], device="cpu", amp="none")
    detector = Detector(loaded, calibration.settings, calibration)
    inside, outside, scores, labels = [], [], [], []
    for item in tumour_items(models):
        result = detector(item)
        lesion = result.data["label"][0].numpy() > 0.5
        brain = result.brain[0, 0].numpy() > 0
        residual = (result.x - result.healed).abs()[0, 0].numpy()
        inside.append(residual[lesion & brain])
        outside.append(residual[brain & ~lesion])
        scores.append(result.score[0, 0].numpy()[brain | lesion])
        labels.append(lesion[brain | lesion])
    ratio = np.concatenate(inside).mean() / np.concatenate(outside).mean()
    auroc = roc_auc(np.concatenate(scores), np.concatenate(labels))
    print(f"lesion / background residual ratio {ratio:.2f}, voxel AUROC {auroc:.3f}")
    assert ratio >= 2.0 and auroc >= 0.8


def test_healing_keeps_voxels_far_from_the_mask(models, calibrated):
    out, _ = calibrated
    calibration = load_calibration(out / "calibration.json")
    loaded = load_anomaly_models(models["codec"], models["diffusion"], device="cpu", amp="none")
    detector = Detector(loaded, calibration.settings, calibration)
    _, x = detector.load(tumour_items(models)[0])
    reconstruction = loaded.codec.decode(loaded.codec.encode(x))
    healing = heal(loaded, x, calibration.settings, calibration.mask_thresholds)
    factor = x.shape[-1] // healing["masks"][0].shape[-1]
    for healed, mask in zip(healing["healed"], healing["masks"]):
        assert 0 < mask.sum() < mask.numel()
        near = F.max_pool3d(mask, 3, stride=1, padding=1)  # the mask and 1 latent cell around it
        far = F.interpolate(near, scale_factor=factor, mode="nearest")[0, 0] == 0
        inside = F.interpolate(mask, scale_factor=factor, mode="nearest")[0, 0] > 0
        change = (healed - reconstruction).abs()[0, 0]
        far_change = change[far]
        print(f"far from the mask: mean change {far_change.mean():.4f}, 99th percentile "
              f"{far_change.quantile(0.99):.4f}, max {far_change.max():.4f}; inside: mean {change[inside].mean():.4f}")
        print(f"far voxels: {float(far.float().mean()):.2f} of the volume")
        assert far.sum() > 0.1 * far.numel()
        assert float(far_change.mean()) < TOLERANCE_MEAN and float(far_change.quantile(0.99)) < TOLERANCE_P99
        assert float(change[inside].mean()) > 4 * float(far_change.mean())  # the healing happened in the mask


def test_healing_reports_every_denoiser_step_and_detection_shows_them(models, calibrated, tmp_path, capsys):
    """heal's callback runs healing_steps times (DDIM back from each start, then RePaint); the detection bar counts
    those steps over all volumes, not volumes."""
    out, _ = calibrated
    calibration = load_calibration(out / "calibration.json")
    loaded = load_anomaly_models(models["codec"], models["diffusion"], device="cpu", amp="none")
    calls = []
    _, x = Detector(loaded, calibration.settings, calibration).load(tumour_items(models)[0])
    heal(loaded, x, calibration.settings, calibration.mask_thresholds, callback=lambda *a: calls.append(a[0]))
    expected = healing_steps(loaded, calibration.settings)
    assert len(calls) == expected > len(calibration.settings.start_steps) * 2
    items = [str(it["image"]) for it in tumour_items(models)[:2]]
    detect_anomalies(models["codec"], models["diffusion"], out / "calibration.json", items, tmp_path / "out",
                     device="cpu", amp="none", progress=True)
    err = capsys.readouterr().err
    assert f"{2 * expected}/{2 * expected}" in err and "step" in err


def test_calibration_is_saved_reloaded_and_applied(models, calibrated, tmp_path):
    out, summary = calibrated
    raw = json.loads((out / "calibration.json").read_text())
    assert raw["format"] == "meddiff3d.anomaly_calibration/2"
    assert raw["settings"]["residual_normalisation"] == "per_volume"
    assert DetectorSettings.from_dict(raw["settings"]) == DetectorSettings.from_dict(DETECTOR)
    assert raw["threshold"] == summary["detector"]["threshold"] and raw["calibration_fpr"] <= raw["target_fpr"]
    assert len(raw["mask_thresholds"]) == len(DETECTOR["start_steps"]) == len(raw["residual_stats"])
    assert raw["models"]["diffusion"]["file"] == "diffusion.pt" and len(raw["healthy"]["ids"]) == 3
    baseline = json.loads((out / "calibration_autoencoder.json").read_text())
    assert baseline["settings"]["method"] == "autoencoder" and baseline["models"]["diffusion"] is None
    image = str(tumour_items(models)[0]["image"])
    maps = {}
    for name, threshold in (("saved", raw["threshold"]), ("high", 1e6), ("low", -1e6)):
        edited = tmp_path / f"{name}.json"
        edited.write_text(json.dumps({**raw, "threshold": threshold}))
        (case,) = detect_anomalies(models["codec"], models["diffusion"], edited, [image], tmp_path / name, **RUN)
        score = nib.load(str(tmp_path / name / case["anomaly_map"])).get_fdata()
        mask = np.asarray(nib.load(str(tmp_path / name / case["mask"])).dataobj)
        np.testing.assert_array_equal(mask, (score > threshold).astype(np.uint8))
        maps[name] = (score, mask)
    np.testing.assert_array_equal(maps["saved"][0], maps["high"][0])  # same map, only the threshold differs
    assert maps["high"][1].sum() == 0 and maps["low"][1].all() and 0 < maps["saved"][1].sum() < maps["saved"][1].size


def test_outputs_keep_the_input_grid_and_affine(models, calibrated, tmp_path):
    """The same head written in LAS orientation, shifted and cropped: outputs follow the file's grid, and flipped back
    they equal the outputs of the RAS original."""
    out, _ = calibrated
    source = nib.load(str(tumour_items(models)[0]["image"]))
    data = np.asarray(source.dataobj, dtype=np.float32)[:, 2:-1, :]
    ras = source.affine.copy()
    ras[:3, 3] += ras[:3, 1] * 2  # cropping 2 voxels at the start of axis 1 moves the origin
    ras[:3, 3] += [3.0, -7.0, 11.0]
    las = ras @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    files = {"ras": tmp_path / "in" / "case_ras.nii.gz", "las": tmp_path / "in" / "case_las.nii.gz"}
    files["ras"].parent.mkdir()
    nib.save(nib.Nifti1Image(data, ras), str(files["ras"]))
    nib.save(nib.Nifti1Image(data[::-1].copy(), las), str(files["las"]))
    cases = detect_anomalies(models["codec"], models["diffusion"], out / "calibration.json",
                             [str(files["ras"]), str(files["las"])], tmp_path / "out", **RUN)
    assert [c["id"] for c in cases] == ["case_ras", "case_las"]
    volumes = {}
    for key, case in zip(("ras", "las"), cases):
        affine = nib.load(str(files[key])).affine
        for name in ("healed", "anomaly_map", "mask"):
            img = nib.load(str(tmp_path / "out" / case[name]))
            assert img.shape == data.shape, (key, name)
            np.testing.assert_allclose(img.affine, affine, atol=1e-4)
            volumes[key, name] = np.asarray(img.dataobj)
        assert volumes[key, "mask"].dtype == np.uint8 and set(np.unique(volumes[key, "mask"])) <= {0, 1}
        assert volumes[key, "anomaly_map"].dtype == np.float32
        assert (tmp_path / "out" / case["preview"]).stat().st_size > 1000
        preview = Image.open(tmp_path / "out" / case["preview"])
        layout = json.loads(preview.text[PREVIEW_INFO_KEY])
        assert all(min(r - left, b - t) >= 256 for left, t, r, b in layout["views"].values())
        threshold = load_calibration(out / "calibration.json").threshold
        assert layout["convention"] == "radiological" and f"{threshold:.3g}" in layout["legend"][0]
    for name in ("healed", "anomaly_map", "mask"):
        np.testing.assert_allclose(volumes["las", name][::-1], volumes["ras", name], atol=1e-4)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [c["id"] for c in summary["cases"]] == ["case_ras", "case_las"]


def test_evaluation_reports_diffusion_and_baseline_side_by_side(models, calibrated, tmp_path):
    out, _ = calibrated
    metrics = evaluate_anomaly(models["codec"], models["diffusion"],
                               {"diffusion": out / "calibration.json", "autoencoder": out / "calibration_autoencoder.json"},
                               models["datalist"], tmp_path / "eval", **RUN)
    with open(tmp_path / "eval" / "per_volume.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 9 and {r["method"] for r in rows} == {"diffusion", "autoencoder"}
    assert {r["lesion_kind"] for r in rows} == {"tumour", "multifocal", "dark", "none"}
    with open(tmp_path / "eval" / "summary.csv", encoding="utf-8") as f:
        summary = list(csv.DictReader(f))
    assert {(r["method"], r["lesion_kind"]) for r in summary} >= {("diffusion", "all"), ("autoencoder", "tumour")}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(metrics["methods"]))
    assert {r["variant"] for r in rows} == {"standard"}  # a standard cohort: one variant group, all its volumes
    assert saved["by_variant"]["diffusion"]["standard"]["volumes"] == 9
    healthy = [float(r["flagged_normal_fraction"]) for r in rows if r["method"] == "diffusion" and
               r["lesion_kind"] == "none"]
    assert saved["by_variant"]["diffusion"]["standard"]["healthy_flagged_fraction"] == pytest.approx(
        sum(healthy) / len(healthy), abs=1e-6)
    diffusion, baseline = metrics["methods"]["diffusion"], metrics["methods"]["autoencoder"]
    print({m: {k: round(v["auprc"] or 0, 3) for k, v in metrics["methods"][m].items()} for m in metrics["methods"]})
    assert diffusion["tumour"]["auprc"] > baseline["tumour"]["auprc"]
    assert diffusion["all"]["volume_auroc"] is not None and 0 <= diffusion["all"]["auroc"] <= 1
