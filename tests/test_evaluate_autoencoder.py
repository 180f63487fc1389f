"""scripts/evaluate_autoencoder.py: reconstruction scores per item and, with --morphometry, the volumes of each input
and of its reconstruction with their agreement."""

import json

import numpy as np
import pytest
import torch

from bundle_testing import script_module
from meddiff3d.engine.checkpoint import build_network
from meddiff3d.evaluation.morphometry import MEASURED_COVARIATES
from meddiff3d.models.codec import LatentCodec, save_codec

SPEC = {"class": "monai.networks.nets.AutoencoderKL",
        "args": dict(spatial_dims=3, in_channels=1, out_channels=1, channels=[8, 16, 16], latent_channels=3,
                     num_res_blocks=1, attention_levels=[False, False, False], norm_num_groups=8,
                     with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)}
SHAPE, SPACING = [32, 48, 32], [5.0, 4.666667, 5.0]  # the 160x224x160 mm box of the synthetic cohorts


@pytest.fixture(scope="module")
def script():
    return script_module("evaluate_autoencoder")


def test_morphometry_measures_each_input_and_its_reconstruction(tmp_path, script):
    from meddiff3d.data.datalist import load_datalist
    from meddiff3d.data.synthetic import write_cohort
    from meddiff3d.data.transforms import t1_brain_transforms
    from meddiff3d.evaluation.morphometry import measure_volumes
    from meddiff3d.models.loading import load_model

    datalist = write_cohort("healthy", tmp_path / "cohort", 12, shape=SHAPE, source="procedural",
                            progress=False).datalist
    torch.manual_seed(0)
    save_codec(LatentCodec(build_network({"network": SPEC})).eval(), tmp_path / "codec.pt",
               {"network": SPEC, "image": {"spacing": SPACING, "shape": SHAPE}})
    out = tmp_path / "eval.json"
    assert script.main(["--codec", str(tmp_path / "codec.pt"), "--datalist", str(datalist), "--section", "training",
                        "--out", str(out), "--max-items", "4", "--morphometry"]) == 0
    result = json.loads(out.read_text())
    rows = result["items"]
    items = load_datalist(datalist, "training")[:4]
    assert [row["id"] for row in rows] == [item["id"] for item in items]
    transform = t1_brain_transforms(SPACING, SHAPE, train=False)
    codec = load_model(tmp_path / "codec.pt", "codec").network
    # the input's volumes are those of the codec's own preprocessing, measured with the cohort's (procedural) atlas
    for row, item in zip(rows, items):
        x = transform(dict(item))["image"].as_tensor().float()[None]
        with torch.no_grad():
            x_hat = codec.decode(codec.encode(x))
        for tag, volume in (("", x), ("_recon", x_hat)):
            truth = measure_volumes(volume[0, 0].numpy(), SPACING, atlas="procedural")
            for name in ("ventricular_ml", "brain_ml"):
                assert row[name + tag] == pytest.approx(truth[name], abs=1e-3), (name + tag, item["id"])
        assert row["ventricular_ml_recon"] != row["ventricular_ml"]  # an untrained codec changes the image
    volumes = result["summary"]["all"]["volumes"]
    for name in ("ventricular_ml", "brain_ml"):
        source, recon = [row[name] for row in rows], [row[f"{name}_recon"] for row in rows]
        assert volumes[name]["mean"] == pytest.approx(np.mean(source))
        assert volumes[name]["mean_recon"] == pytest.approx(np.mean(recon))
        assert volumes[name]["r"] == pytest.approx(np.corrcoef(source, recon)[0, 1], abs=1e-9)
    # a synthetic cohort knows each subject's volumes: the measurement's agreement with the truth, on both images
    for key, name in MEASURED_COVARIATES.items():
        truth = [item["covariates_raw"][key] for item in items]
        assert [row[f"{name}_true"] for row in rows] == truth
        source, recon = [row[name] for row in rows], [row[f"{name}_recon"] for row in rows]
        assert volumes[name]["mean_true"] == pytest.approx(np.mean(truth))
        assert volumes[name]["r_true"] == pytest.approx(np.corrcoef(truth, source)[0, 1], abs=1e-9)
        assert volumes[name]["r_true_recon"] == pytest.approx(np.corrcoef(truth, recon)[0, 1], abs=1e-9)


def test_without_morphometry_no_volumes_are_measured(script):
    rows = [{"variant": "standard", "psnr_brain": 20.0 + k, "ssim_brain": 0.5, "psnr": 25.0, "ssim": 0.7}
            for k in range(3)]
    summary = script.summarise(rows)
    assert "volumes" not in summary["all"] and summary["all"]["psnr_brain"]["mean"] == pytest.approx(21.0)


def test_agreement_with_the_truth_only_when_every_item_knows_it(script):
    rows = [{"ventricular_ml": 10.0 + k, "ventricular_ml_recon": 9.0 + 2 * k, "brain_ml": 1000.0 + k,
             "brain_ml_recon": 990.0 + k * k, "ventricular_ml_true": 5.0 + k * k} for k in range(4)]
    volumes = script.volume_agreement(rows)
    assert volumes["ventricular_ml"]["mean_true"] == pytest.approx(8.5)
    expected = np.corrcoef([5, 6, 9, 14], [9, 11, 13, 15])[0, 1]
    assert volumes["ventricular_ml"]["r_true_recon"] == pytest.approx(expected)
    assert "r_true" not in volumes["brain_ml"]  # no item carries brain_ml_true
    rows[0].pop("ventricular_ml_true")
    assert "r_true" not in script.volume_agreement(rows)["ventricular_ml"]
