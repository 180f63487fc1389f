"""The 2D image diffusion model end to end on a tiny class-conditional dataset: a 2D datalist of PNG files, training
(bounded by iterations; the tests on the trained model are slow: ~25 s of training, then sampling), the model file,
generation and its outputs, the reconstructions, and the bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff3d.data.datalist import write_datalist
from meddiff3d.data.images2d import read_image_2d
from meddiff3d.errors import InputError
from meddiff3d.models.image_diffusion import class_labels, image_unet_spec
from meddiff3d.models.loading import load_model
from meddiff3d.pipelines.image_generation import generate_images
from meddiff3d.pipelines.image_training import load_image_set, train_image_diffusion

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, CLASSES = 16, ("left", "right")


def blob_image(side: str, rng: np.random.Generator) -> np.ndarray:
    """A bright blob in the left or right half of a dark 16x16 image (uint8)."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    centre = (SIZE / 2 + rng.normal(0, 1), (SIZE / 4 if side == "left" else 3 * SIZE / 4) + rng.normal(0, 1))
    image = 0.1 + 0.8 * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 2.0**2))
    return np.clip((image + rng.normal(0, 0.02, image.shape)) * 255, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    rng = np.random.default_rng(0)
    items = []
    for i in range(48):
        side = CLASSES[i % 2]
        Image.fromarray(blob_image(side, rng)).save(root / f"img{i:02d}.png")
        items.append({"id": f"img{i:02d}", "image": f"img{i:02d}.png", "class": side})
    return write_datalist(root / "datalist.json", {"training": items}, spatial_dims=2, modalities=["image"],
                          classes=list(CLASSES))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("train2d")
    summary = train_image_diffusion(dataset, root / "run", out=root / "model.pt", shape=(SIZE, SIZE),
                                    classes=CLASSES, network="test", max_iterations=400, batch_size=16, lr=2e-3,
                                    ema_decay=0.95, checkpoint_every=200, amp="none", device="cpu", progress=False,
                                    sampling={"sampler": "dpmpp_2m", "steps": 20})
    return root / "model.pt", summary


def test_image_set_scales_each_image_by_its_own_window(dataset):
    images = load_image_set(dataset, (SIZE, SIZE), classes=CLASSES)
    assert images.images.shape == (48, 1, SIZE, SIZE) and images.labels.tolist() == [0, 1] * 24
    flat = images.images.flatten(1)
    assert torch.quantile(flat, 0.995, dim=1).sub(1).abs().max() < 0.05  # each image's 99.5th percentile -> 1
    small = load_image_set(dataset, (8, 8))
    assert small.images.shape == (48, 1, 8, 8) and small.labels is None and small.spacing == [2.0, 2.0]


@pytest.mark.slow
def test_trained_model_file_and_class_conditional_samples(trained, tmp_path):
    """After 400 iterations the samples of each class put their blob on that class's side (half-image intensity
    difference, right minus left, of opposite sign and at least 0.1 for both classes: the classes are learnt)."""
    path, summary = trained
    loaded = load_model(path, "image_diffusion")
    meta = loaded.meta
    assert meta["classes"] == list(CLASSES) and meta["image"]["shape"] == [SIZE, SIZE]
    assert meta["network"]["args"]["num_class_embeds"] == 3 and meta["sampling"]["sampler"] == "dpmpp_2m"
    assert meta["training"]["num_images"] == 48 and meta["prediction"] == "v"
    side_difference = {}
    for name in CLASSES:
        paths = generate_images(loaded, tmp_path / name, num_samples=8, class_name=name, guidance_scale=2.0,
                                device="cpu", amp="none", progress=False)
        images = np.stack([read_image_2d(p).array for p in paths])
        assert images.shape == (8, SIZE, SIZE) and images.min() >= 0 and images.max() <= 1
        side_difference[name] = float((images[:, :, SIZE // 2:].mean() - images[:, :, :SIZE // 2].mean()))
        side = json.loads((tmp_path / name / "sample_seed0.json").read_text())
        assert side["class"] == name and side["sampler"] == "dpmpp_2m" and side["steps"] == 20
        png = np.asarray(Image.open(tmp_path / name / "sample_seed0.png"), dtype=np.float32) / 255
        np.testing.assert_allclose(png, read_image_2d(paths[0]).array, atol=1 / 255)
        assert (tmp_path / name / "samples.png").is_file()
    assert side_difference["right"] > 0.1 and side_difference["left"] < -0.1, side_difference


@pytest.mark.slow
def test_bad_settings_are_refused_before_anything_is_written(trained, tmp_path):
    path, _ = trained
    out = tmp_path / "out"
    for kwargs, match in (({"class_name": "middle"}, "unknown class 'middle'; this model knows left, right"),
                          ({"guidance_scale": 3.0}, "guidance_scale needs a class"),
                          ({"sampler": "euler_a"}, "unknown sampler 'euler_a'"),
                          ({"num_samples": 0}, "num_samples")):
        with pytest.raises(InputError, match=match):
            generate_images(path, out, device="cpu", amp="none", progress=False, **kwargs)
        assert not out.exists()


def test_a_3d_datalist_or_missing_classes_are_refused(dataset):
    doc = json.loads(dataset.read_text())
    three = write_datalist(dataset.parent / "three.json", {"training": doc["training"]})
    with pytest.raises(InputError, match=r"not a 2D datalist \(it needs \"spatial_dims\": 2"):
        load_image_set(three, (SIZE, SIZE))
    unlabelled = write_datalist(dataset.parent / "unlabelled.json", {"training": [dict(i, **{"class": None})
                                                                  for i in doc["training"]]}, spatial_dims=2)
    with pytest.raises(InputError, match="item 'img00' has no 'class'"):
        load_image_set(unlabelled, (SIZE, SIZE), classes=CLASSES)
    assert class_labels(["right", None], CLASSES).tolist() == [1, 2]
    assert image_unet_spec(1, (), "test")["args"].get("num_class_embeds") is None


@pytest.mark.slow
def test_diffusion_reconstruction_of_undersampled_k_space_beats_zero_filling(trained):
    """A held-out blob image, 4x undersampled k-space (4 of 16 lines): the posterior mean of 4 samples under the tiny
    model has under 0.3 times the NMSE of the zero-filled inverse FFT (measured 0.05-0.13 times over 3 images x 2
    masks), and it keeps the measured lines."""
    from meddiff3d.diffusion import KSpaceSampling, cartesian_mask
    from meddiff3d.pipelines.inferers import ImageDiffusionInferer
    from meddiff3d.pipelines.inverse_problems import diffusion_reconstruction, nmse, zero_filled

    loaded = load_model(trained[0], "image_diffusion")
    truth = torch.from_numpy(blob_image("right", np.random.default_rng(99)) / 255.0).float()[None, None]
    op = KSpaceSampling(cartesian_mask(SIZE, 4, 0.125, "random", seed=3).float())
    y = op.forward(truth)
    inferer = ImageDiffusionInferer(loaded.meta, steps=20)
    estimate, spread = diffusion_reconstruction(loaded.network, inferer, op, y, num_samples=4, class_name="right",
                                                window_=(float(truth.min()), float(truth.max())))
    assert estimate.shape == truth.shape and spread is not None and spread.shape == truth.shape
    assert nmse(estimate, truth) < 0.3 * nmse(zero_filled(op, y), truth), (nmse(estimate, truth),
                                                                          nmse(zero_filled(op, y), truth))
    torch.testing.assert_close(op.forward(estimate), y, atol=1e-3, rtol=0)


@pytest.mark.slow
def test_inverse_problem_table_script_end_to_end(trained, tmp_path):
    """scripts/evaluate_inverse_problems.py on held-out blob images with the tiny model: every method of every
    setting scored, the TV weight chosen on the validation slices, the example strip written."""
    from bundle_testing import script_module

    rng = np.random.default_rng(7)
    sections = {}
    for section, count in (("validation", 1), ("test", 2)):
        sections[section] = []
        for i in range(count):
            path = tmp_path / f"{section}{i}.png"
            Image.fromarray(blob_image(CLASSES[i % 2], rng)).save(path)
            sections[section].append({"id": f"{section}{i}", "image": str(path), "class": CLASSES[i % 2]})
    datalist = write_datalist(tmp_path / "held_out.json", sections, spatial_dims=2, classes=list(CLASSES))
    script = script_module("evaluate_inverse_problems")
    out = tmp_path / "table"
    assert script.main(["--model", str(trained[0]), "--datalist", str(datalist), "--out", str(out), "--n", "2",
                        "--tune", "1", "--steps", "5", "--accelerations", "4", "--factors", "2",
                        "--tv-iterations", "20"]) == 0
    table = json.loads((out / "table.json").read_text())["table"]
    assert set(table) == {"kspace_4x", "sr_2x"}
    assert set(table["kspace_4x"]["methods"]) == {"zero_filled", "tv", "diffusion"}
    assert set(table["sr_2x"]["methods"]) == {"bicubic", "bspline", "tv", "diffusion"}
    assert all(np.isfinite(m["psnr"]) and m["seconds"] >= 0 for s in table.values() for m in s["methods"].values())
    assert table["kspace_4x"]["tv_lambda"] in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert len((out / "per_slice.csv").read_text().splitlines()) == 1 + 2 * 7
    assert Image.open(out / "examples.png").size == (5 * SIZE, 2 * SIZE + 2)  # truth + the methods, per setting


@pytest.mark.slow
def test_reconstruction_commands_from_files(trained, tmp_path):
    """reconstruct(): a PNG with simulated 4x k-space, the same k-space as a .npy, super-resolution of a full-size
    image (simulated) and of a real low-resolution one; outputs on disk, the estimate beats the baseline where a
    reference exists; bad inputs fail before anything is written."""
    from meddiff3d.diffusion import fft2c
    from meddiff3d.pipelines.reconstruction import reconstruct

    loaded = load_model(trained[0], "image_diffusion")
    rng = np.random.default_rng(11)
    Image.fromarray(blob_image("left", rng)).save(tmp_path / "slice.png")
    Image.fromarray(blob_image("left", rng)[::2, ::2]).save(tmp_path / "small.png")
    common = {"num_samples": 2, "steps": 10, "class_name": "left"}
    (recon,) = reconstruct(loaded, [tmp_path / "slice.png"], tmp_path / "k", task="kspace", **common)
    record = json.loads((tmp_path / "k" / "slice.json").read_text())
    assert recon.name == "slice_recon.nii.gz" and record["baseline_method"] == "zero_filled"
    assert len(record["mask"]) == SIZE
    assert record["recon"]["nmse"] < record["baseline"]["nmse"], record
    for suffix in ("_baseline.nii.gz", "_std.nii.gz", "_recon.png"):
        assert (tmp_path / "k" / f"slice{suffix}").is_file(), suffix
    truth = read_image_2d(tmp_path / "slice.png").array
    mask = np.asarray(record["mask"], np.float32)
    np.save(tmp_path / "kspace.npy", (fft2c(torch.from_numpy(truth).double()).numpy() * mask).astype(np.complex64))
    (from_npy,) = reconstruct(loaded, [tmp_path / "kspace.npy"], tmp_path / "npy", task="kspace", **common)
    np.testing.assert_allclose(read_image_2d(from_npy).array, read_image_2d(recon).array, rtol=0, atol=2.0)
    (sr,) = reconstruct(loaded, [tmp_path / "slice.png"], tmp_path / "sr", task="super_resolution", factor=2,
                        **common)
    record = json.loads((tmp_path / "sr" / "slice.json").read_text())
    assert record["baseline_method"] == "bicubic" and np.isfinite(record["recon"]["psnr"])
    (up,) = reconstruct(loaded, [tmp_path / "small.png"], tmp_path / "up", task="super_resolution", factor=2,
                        **common)
    assert read_image_2d(up).shape == (SIZE, SIZE) and "recon" not in json.loads((tmp_path / "up" /
                                                                                   "small.json").read_text())
    np.save(tmp_path / "real.npy", truth)
    for inputs, kwargs, match in (([tmp_path / "real.npy"], {"task": "kspace"}, "must be a complex"),
                                  ([tmp_path / "small.png"], {"task": "kspace"}, "the model reconstructs"),
                                  ([tmp_path / "slice.png"], {"task": "super_resolution", "factor": 3},
                                   "needs the model's size \\[16, 16\\] to be a multiple"),
                                  ([tmp_path / "small.png"], {"task": "super_resolution", "factor": 4},
                                   "neither the model's size"),
                                  ([tmp_path / "slice.png"], {"task": "deblur"}, "task")):
        with pytest.raises(InputError, match=match):
            reconstruct(loaded, inputs, tmp_path / "none", **kwargs)
        assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_generation_evaluation_sees_the_learnt_classes(trained, dataset, tmp_path):
    """meddiff3d.evaluation.image_generation on the tiny model with 8 held-out blobs: the nearest-centroid classifier
    tells the held-out real classes apart (accuracy 1), the samples of each class are classified as that class
    (>= 0.75, chance 0.5), and every section of the record is there; samples.png holds one row per class."""
    from meddiff3d.evaluation.image_generation import evaluate_image_generation

    doc = json.loads(dataset.read_text())
    rng = np.random.default_rng(7)
    training = [dict(item, image=str(dataset.parent / item["image"])) for item in doc["training"]]
    test = []
    for i in range(8):
        Image.fromarray(blob_image(CLASSES[i % 2], rng)).save(tmp_path / f"held{i}.png")
        test.append({"id": f"held{i}", "image": str(tmp_path / f"held{i}.png"), "class": CLASSES[i % 2]})
    datalist = write_datalist(tmp_path / "datalist.json", {"training": training, "test": test}, spatial_dims=2,
                              modalities=["image"], classes=list(CLASSES))
    result = evaluate_image_generation(trained[0], datalist, tmp_path / "eval", samples_per_class=8, steps=10,
                                       device="cpu", amp="none")
    fidelity = result["class_fidelity"]
    assert fidelity["held_out_real_accuracy"] == 1.0 and fidelity["chance"] == 0.5
    assert min(fidelity["generated_accuracy"].values()) >= 0.75, fidelity
    assert result["memorisation"]["of"] == 24 and 0 < result["diversity_ms_ssim_within_class"]["generated"] < 1
    assert result["time"]["seconds_per_image"] > 0 and result["steps"] == 10
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["classes"] == list(CLASSES)
    assert Image.open(tmp_path / "eval" / "samples.png").size[1] >= 3 * SIZE  # left, right, unconditional rows
