"""``train_autoencoder`` end to end on a tiny procedural synthetic cohort: reconstruction quality, the codec file,
exact resume, re-runs. One module-scoped training run (~20 s on 2 CPU threads) serves most tests.

Stated bound: a KL autoencoder with channels (8, 16, 16) (x4 downsampling, 87 k parameters) trained for 300 steps
on 16^3 patches of 6 subjects at 32x48x32 (~5 mm) reaches >= 16 dB PSNR (measured: 18.3 dB, SSIM 0.57) on the 2
held-out validation volumes, against 1.7 dB (SSIM 0.00) before training.
"""

from __future__ import annotations

import json

import pytest
import torch

from meddiff3d.data.datalist import load_datalist
from meddiff3d.data.synthetic import write_cohort
from meddiff3d.data.transforms import t1_brain_transforms
from meddiff3d.engine.checkpoint import build_network, read_file
from meddiff3d.engine.trainer import seed_everything
from meddiff3d.models.autoencoder import autoencoder_spec
from meddiff3d.models.codec import LatentCodec
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.autoencoder_training import metrics_path, reconstruction_metrics, train_autoencoder

SHAPE, SPACING, PATCH = (32, 48, 32), (5.0, 4.666667, 5.0), (16, 16, 16)
NETWORK = {"channels": [8, 16, 16], "norm_num_groups": 8}
SETTINGS = dict(network=NETWORK, discriminator={"num_layers_d": 2, "channels": 8}, patch_size=PATCH,
                spacing=SPACING, shape=SHAPE, batch_size=2, lr=1e-3, device="cpu", progress=False,
                calibrate_volumes=4, eval_volumes=2)  # fmt: skip
PSNR_BOUND = 16.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    summary = write_cohort("healthy", out, 8, shape=SHAPE, source="procedural", progress=False)
    assert summary.counts == {"training": 6, "validation": 2, "test": 0}
    return summary.datalist


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    run = tmp_path_factory.mktemp("ae_run")
    metrics = train_autoencoder(cohort, run, codec_out=run / "codec.pt", max_iterations=300, adv_warmup=150,
                                checkpoint_every=150, **SETTINGS)
    return run, metrics


def validation_volumes(datalist, n=2):
    transform = t1_brain_transforms(SPACING, SHAPE, train=False)
    return [transform(item)["image"].as_tensor()[None] for item in load_datalist(datalist, "validation")[:n]]


@pytest.mark.slow
def test_training_beats_the_untrained_network_and_reaches_the_psnr_bound(trained, cohort):
    run, metrics = trained
    seed_everything(0)
    untrained = LatentCodec(build_network(autoencoder_spec("kl", **NETWORK))).eval()
    before = reconstruction_metrics(untrained, validation_volumes(cohort))
    assert metrics["eval_volumes"] == 2 and metrics["iterations"] == 300
    assert metrics["psnr"] >= PSNR_BOUND, metrics
    assert metrics["psnr"] > before["psnr"] + 5 and metrics["ssim"] > before["ssim"], (before, metrics)
    # inside the brain: harder than the mostly-background whole volume, and still far better than untrained
    assert metrics["psnr_brain"] < metrics["psnr"] and metrics["psnr_brain"] > before["psnr_brain"] + 3
    assert before["ssim_brain"] < metrics["ssim_brain"] <= 1.0
    assert json.loads(metrics_path(run / "codec.pt").read_text())["psnr"] == pytest.approx(metrics["psnr"])
    assert (run / "tensorboard").is_dir() and list((run / "previews").glob("*.png"))


@pytest.mark.slow
def test_codec_file_holds_everything_inference_needs(trained, cohort):
    run, metrics = trained
    raw = torch.load(run / "codec.pt", weights_only=True)  # weights-only: tensors and plain values
    assert float(raw["weights"]["latent_scale"]) == pytest.approx(metrics["latent_scale"])
    assert float(raw["weights"]["latent_shift"]) == pytest.approx(metrics["latent_shift"])
    loaded = load_model(run / "codec.pt", "codec")
    codec, meta = loaded.network, loaded.meta
    assert float(codec.latent_scale) == float(raw["weights"]["latent_scale"])  # reused unchanged, never recomputed
    assert float(codec.latent_shift) == float(raw["weights"]["latent_shift"])
    assert meta["network"] == autoencoder_spec("kl", **NETWORK)
    image = meta["image"]
    assert image["shape"] == list(SHAPE) and image["spacing"] == pytest.approx(SPACING)
    assert image["orientation"] == "RAS"
    assert image["normalisation"]["kind"] == "percentile" and image["normalisation"]["upper"] == 99.5
    affine = torch.tensor(image["example_affine"])
    assert affine.shape == (4, 4) and torch.allclose(affine.diagonal()[:3].abs(), torch.tensor(SPACING), atol=1e-4)
    assert meta["latent"]["shape"] == [3, 8, 12, 8] == list(codec.latent_shape(SHAPE))
    training = meta["training"]
    assert training["n_training"] == 6 and training["n_validation"] == 2 and training["iterations"] == 300
    assert len(training["datalist_sha256"]) == 64 and training["evaluation_ids"]
    z = codec.encode(validation_volumes(cohort, 1)[0])
    assert z.shape == (1, 3, 8, 12, 8)
    # the engine's own exports of the wrapped network rebuild from their meta, weights-only
    ckpt = read_file(run / "inference.pt")
    wrapper = build_network(ckpt["meta"])
    wrapper.load_state_dict(ckpt["ema"])
    assert int(wrapper.training_forwards) == 300


@pytest.mark.slow
def test_rerun_of_a_finished_run_does_not_retrain(trained, cohort):
    run, metrics = trained
    again = train_autoencoder(cohort, run, codec_out=run / "codec.pt", max_iterations=300, adv_warmup=150,
                              checkpoint_every=150, **SETTINGS)
    assert again["resumed_from"] == 300 and again["iterations"] == 300
    assert again["latent_scale"] == pytest.approx(metrics["latent_scale"], rel=1e-6)
    assert again["psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(cohort, tmp_path):
    """A run stopped at step 10 and continued to 20 ends with the weights of an uninterrupted 20-step run: patches
    (global torch RNG), KL samples and the adversarial warm-up counter all resume."""
    short = dict(SETTINGS, calibrate_volumes=1, eval_volumes=1)
    train_autoencoder(cohort, tmp_path / "a", codec_out=tmp_path / "a.pt", max_iterations=20, adv_warmup=5,
                      checkpoint_every=10, **short)
    train_autoencoder(cohort, tmp_path / "b", codec_out=tmp_path / "b.pt", max_iterations=10, adv_warmup=5,
                      checkpoint_every=10, **short)
    resumed = train_autoencoder(cohort, tmp_path / "b", codec_out=tmp_path / "b.pt", max_iterations=20,
                                adv_warmup=5, checkpoint_every=10, **short)
    assert resumed["resumed_from"] == 10
    a = read_file(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    b = read_file(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
