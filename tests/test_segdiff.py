"""PatchDDM parts and segmentation diffusion inference: patch coordinates, sliding windows, network specs, ensemble
statistics, the output contract on the input grid, and clear failures on bad input (untrained models, seconds each)."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiff3d.data.patches import RandPatchd, patch_corner
from meddiff3d.data.synthetic import write_cohort
from meddiff3d.diffusion import AppendCoordinates, ConcatConditioning, CoordinateChannels, SlidingWindowNetwork
from meddiff3d.errors import DatalistError, InputError
from meddiff3d.models.segdiff import (
    SEGDIFF_PRESETS,
    check_volume_shape,
    conditioned_network,
    parameter_count,
    save_untrained_model,
    segdiff_meta,
    segdiff_unet_spec,
)
from meddiff3d.models.loading import load_model
from meddiff3d.models.segdiff import ensemble_statistics
from meddiff3d.pipelines.segmentation import LABEL_LEGEND, output_paths, segment
from meddiff3d.utils.io import PREVIEW_INFO_KEY, read_channels


def preview_views(path):
    from PIL import Image

    img = Image.open(path)
    info = json.loads(img.text[PREVIEW_INFO_KEY])
    rgb = np.asarray(img.convert("RGB"))
    return {k: rgb[t:b, left:r] for k, (left, t, r, b) in info["views"].items()}, info

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE, SPACING = (32, 48, 32), (5.0, 5.0, 5.0)  # the 160x224x160 mm box of the synthetic cohorts at 5 mm


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """4 BraTS-like cases on the model grid; 2 of them in the test split."""
    out = tmp_path_factory.mktemp("cohort")
    return write_cohort("brats", out, n=4, seed=3, shape=SHAPE, source="procedural", val_fraction=0.0,
                        test_fraction=0.5, progress=False).datalist


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_untrained_model(tmp_path_factory.mktemp("model") / "model.pt", shape=SHAPE, spacing=SPACING)


def edited_datalist(datalist, tmp_path, edit):
    """A copy of ``datalist`` (absolute paths) after ``edit(doc)``."""
    doc = json.loads(Path(datalist).read_text())
    root = Path(datalist).parent
    for section in ("training", "validation", "test"):
        for item in doc.get(section, []):
            item["image"] = [str(root / f) for f in item["image"]]
            if "label" in item:
                item["label"] = str(root / item["label"])
    edit(doc)
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(doc))
    return path


# ------------------------------------------------------------------------------------------------ patches
@pytest.mark.parametrize("foreground_prob", [0.0, 1.0])
def test_patch_coordinates_equal_the_crop_of_the_full_volume_coordinates(foreground_prob):
    full = (24, 32, 16)
    label = torch.zeros(1, *full)
    label[0, 18:21, 3:6, 10:13] = 1  # a small tumour off centre
    item = {"image": torch.arange(np.prod(full), dtype=torch.float32).reshape(1, *full), "label": label}
    crop = RandPatchd(["image", "label"], (8, 8, 8), foreground_prob=foreground_prob)
    torch.manual_seed(0)  # the sampler draws from the global torch RNG
    coords = CoordinateChannels(full)
    whole = coords(full)[0]
    corners = set()
    for _ in range(20):
        patch = crop(item)
        lo = patch["patch_offset"].numpy()
        box = tuple(slice(int(a), int(a) + 8) for a in lo)
        corners.add(tuple(lo))
        assert torch.equal(patch["image"][0], item["image"][0][box])  # the offset is where the patch was cut
        assert torch.equal(coords((8, 8, 8), patch["patch_offset"])[0], whole[(slice(None), *box)])
        if foreground_prob == 1.0:
            assert patch["label"].sum() > 0
    assert len(corners) > 5  # random positions


def test_coordinates_reach_the_network_through_append_coordinates():
    full = (16, 24, 16)
    seen = {}

    def net(x, timesteps):
        seen["coords"] = x[:, -3:]
        return x[:, :1]

    wrapped = AppendCoordinates(net, CoordinateChannels(full))
    offset = torch.tensor([[8, 0, 4], [0, 16, 8]])
    wrapped(torch.zeros(2, 1, 8, 8, 8), timesteps=torch.zeros(2), patch_offset=offset)
    whole = CoordinateChannels(full)(full)[0]
    for b, (i, j, k) in enumerate(offset.tolist()):
        assert torch.equal(seen["coords"][b], whole[:, i:i + 8, j:j + 8, k:k + 8])
    assert wrapped.num_channels == 3


def test_patch_corner_rejects_patches_larger_than_the_volume():
    with pytest.raises(InputError, match="does not fit"):
        patch_corner((16, 16, 16), (32, 8, 8))


# ------------------------------------------------------------------------------------------------ sliding window
def test_sliding_window_gives_each_window_its_true_position():
    """A network returning its coordinate channels, run window by window, reassembles the whole volume's coordinates;
    conditioning tensors are cut like the input."""
    full = (16, 24, 16)

    def net(x, timesteps):
        return x[:, -3:] * (1 + 0 * timesteps[:, None, None, None, None])

    windowed = ConcatConditioning(SlidingWindowNetwork(AppendCoordinates(net, CoordinateChannels(full)),
                                                       roi_size=(8, 16, 8), overlap=0.5, sw_batch_size=3), "image")
    x = torch.zeros(2, 3, *full)
    out = windowed(x, timesteps=torch.tensor([10.0, 20.0]), image=torch.randn(2, 4, *full))
    expected = CoordinateChannels(full)(full, batch_size=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_sliding_window_over_the_whole_volume_equals_one_pass(model):
    loaded = load_model(model, "segmentation_diffusion")
    network, meta = loaded.network, loaded.meta
    x, image, t = torch.randn(2, 3, *SHAPE), torch.randn(2, 4, *SHAPE), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        whole = conditioned_network(network, meta)(x, timesteps=t, image=image)
        window = conditioned_network(network, meta, roi_size=(64, 64, 64))(x, timesteps=t, image=image)
    torch.testing.assert_close(window, whole, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ network specs
def test_presets_derive_channels_and_patchddm_has_the_papers_size():
    coords = CoordinateChannels((240, 240, 160))
    spec = segdiff_unet_spec("patchddm", coordinates=coords)
    assert spec["args"]["in_channels"] == 3 + 4 + coords.num_channels == 10 and spec["args"]["out_channels"] == 3
    assert 16.5e6 < parameter_count(spec) < 17.0e6  # 16.84 M: PatchDDM's 32/64/128/128 U-Net
    assert parameter_count(segdiff_unet_spec("tiny_cpu")) < 1e6
    assert set(SEGDIFF_PRESETS) == {"patchddm", "tiny_cpu"}
    with pytest.raises(InputError, match="no attention"):
        segdiff_unet_spec("tiny_cpu", attention_levels=[False, False, False, True])
    with pytest.raises(InputError, match="derived"):
        segdiff_unet_spec("tiny_cpu", in_channels=8)
    with pytest.raises(InputError, match="multiples of 8"):
        check_volume_shape((30, 48, 32), spec)
    with pytest.raises(InputError, match="larger than the image shape"):
        segdiff_meta(network=spec, shape=(32, 48, 32), spacing=SPACING, patch_size=(64, 48, 32))


# ------------------------------------------------------------------------------------------------ ensembles
def test_ensemble_statistics_of_known_samples():
    samples = torch.full((4, 3, 2, 2, 2), -1.0)
    samples[:2, 0] = 1.0  # WT: two of four samples say tumour -> p 0.5, variance 0.25, entropy ln 2
    samples[:, 1] = 1.0  # TC: all agree -> p 1, variance 0, entropy 0
    stats = ensemble_statistics(samples)
    assert all(v.shape == (3, 2, 2, 2) and v.dtype == torch.float32 for v in stats.values())
    torch.testing.assert_close(stats["prob"][:, 0, 0, 0], torch.tensor([0.5, 1.0, 0.0]))
    torch.testing.assert_close(stats["variance"][:, 0, 0, 0], torch.tensor([0.25, 0.0, 0.0]))
    torch.testing.assert_close(stats["entropy"][:, 0, 0, 0], torch.tensor([float(np.log(2)), 0.0, 0.0]))
    single = ensemble_statistics(samples[:1])
    assert float(single["variance"].abs().max()) == 0.0


def test_ensemble_probability_is_the_members_vote_not_their_magnitude():
    """A member's sign is its segmentation: masks that stop at -0.8 over healthy tissue (an under-trained model)
    give probability 0, not 0.1; mixed magnitudes count as votes; another mask range moves the midpoint."""
    healthy = ensemble_statistics(torch.full((5, 3, 2, 2, 2), -0.8))
    assert float(healthy["prob"].abs().max()) == 0.0 and float(healthy["entropy"].abs().max()) == 0.0
    torch.testing.assert_close(healthy["variance"], torch.zeros(3, 2, 2, 2))  # they agree in magnitude too
    mixed = ensemble_statistics(torch.tensor([0.3, -0.2, 0.6, -0.9]).reshape(4, 1, 1, 1, 1))
    assert float(mixed["prob"]) == 0.5 and float(mixed["entropy"]) == pytest.approx(np.log(2))
    soft = (torch.tensor([0.3, -0.2, 0.6, -0.9]) + 1) / 2
    assert float(mixed["variance"]) == pytest.approx(float(soft.var(unbiased=False)))
    unit = ensemble_statistics(torch.tensor([0.6, 0.4, 0.9]).reshape(3, 1, 1, 1, 1), mask_range=(0.0, 1.0))
    assert float(unit["prob"]) == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------------ inference
def check_case(out_dir, case_id, image_file, n_samples):
    """The output contract: files, dtypes, shapes and affines of the input image, labels 0/1/2/4."""
    paths = output_paths(out_dir, case_id)
    ref = nib.load(str(image_file))
    seg = nib.load(str(paths["seg"]))
    assert seg.get_data_dtype() == np.uint8 and seg.shape == ref.shape
    np.testing.assert_allclose(seg.affine, ref.affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}
    maps = {}
    for key in ("prob", "variance", "entropy"):
        img = nib.load(str(paths[key]))
        # a NIfTI vector per voxel (dim[5] = 3, intent VECTOR), not three time points
        assert img.get_data_dtype() == np.float32 and img.shape == (*ref.shape, 1, 3), key
        assert int(img.header["intent_code"]) == 1007 and img.header.get_intent()[2] == "WT,TC,ET", key
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        maps[key], _ = read_channels(paths[key])
        assert maps[key].shape == (*ref.shape, 3), key
        assert np.isfinite(maps[key]).all() and maps[key].min() >= 0
    assert maps["prob"].max() <= 1 and maps["variance"].max() <= 0.25 + 1e-6
    assert maps["entropy"].max() <= np.log(2) + 1e-6
    # the label map is the nested decision of the probability file
    prob = maps["prob"]
    assert np.array_equal(labels > 0, prob[..., 0] > 0.5)
    assert np.array_equal(labels == 4, (prob[..., 0] > 0.5) & (prob[..., 1] > 0.5) & (prob[..., 2] > 0.5))
    if n_samples == 1:
        assert maps["variance"].max() == 0
    assert paths["preview"].stat().st_size > 0
    views, preview = preview_views(paths["preview"])
    assert all(min(v.shape[:2]) >= 256 for v in views.values()) and preview["convention"] == "radiological"
    assert preview["legend"] == [name for name, _ in LABEL_LEGEND.values()]
    info = json.loads(paths["info"].read_text())
    assert info["num_samples"] == n_samples and info["files"]["seg"] == paths["seg"].name
    # the sidecar's mean entropy is in nats (the unit of the entropy file): at most ln 2 per region
    assert "mean_entropy_bits" not in info and set(info["mean_entropy_nats"]) == {"WT", "TC", "ET"}
    for c, region in enumerate(("WT", "TC", "ET")):
        assert info["mean_entropy_nats"][region] == pytest.approx(float(maps["entropy"][..., c].mean()), abs=1e-5)
    return labels, maps


def test_segment_writes_the_output_contract_on_the_input_grid(cohort, model, tmp_path):
    out = tmp_path / "out"
    folders = segment(model, cohort, section="test", output_dir=out, num_samples=3, steps=2, device="cpu",
                      amp="none", progress=False)
    doc = json.loads(Path(cohort).read_text())
    assert [f.name for f in folders] == [item["id"] for item in doc["test"]]
    for item in doc["test"]:
        check_case(out, item["id"], Path(cohort).parent / item["image"][0], 3)


def test_progress_counts_every_denoising_step_of_the_ensemble(cohort, model, tmp_path, capsys):
    """The bar ticks once per sample and step (2 cases x N=3 x 2 steps, batches of 2), not once per case."""
    segment(model, cohort, section="test", output_dir=tmp_path / "out", num_samples=3, steps=2, batch_size=2,
            device="cpu", amp="none", progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "step" in err
    segment(model, cohort, section="test", output_dir=tmp_path / "quiet", num_samples=1, steps=2, device="cpu",
            amp="none", progress=False)
    assert capsys.readouterr().err == ""


def test_outputs_follow_an_input_grid_other_than_the_models(model, tmp_path):
    """Inputs at 4 mm (40x56x40) through a 5 mm model: outputs come back on the 4 mm grid with its affine."""
    datalist = write_cohort("brats", tmp_path / "c4mm", n=2, seed=5, shape=(40, 56, 40), source="procedural",
                            val_fraction=0.0, test_fraction=0.5, progress=False).datalist
    out = tmp_path / "out"
    segment(model, datalist, section="test", output_dir=out, num_samples=1, steps=2, sampler="dpmpp_2m",
            roi_size=(16, 24, 16), device="cpu", amp="none", progress=False)
    item = json.loads(Path(datalist).read_text())["test"][0]
    labels, _ = check_case(out, item["id"], Path(datalist).parent / item["image"][3], 1)
    assert labels.shape == (40, 56, 40)


def test_samples_are_reproducible_and_differ_between_seeds(cohort, model, tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        segment(model, cohort, section="test", output_dir=tmp_path / name, num_samples=1, steps=2, seed=seed,
                device="cpu", amp="none", progress=False)
        case = json.loads(Path(cohort).read_text())["test"][0]["id"]
        runs[name] = np.asarray(nib.load(str(output_paths(tmp_path / name, case)["prob"])).dataobj)
    assert np.array_equal(runs["a"], runs["b"]) and not np.array_equal(runs["a"], runs["c"])


# ------------------------------------------------------------------------------------------------ bad inputs
def _three_sequences(doc):
    doc["modalities"] = doc["modalities"][:3]
    for item in doc["test"]:
        item["image"] = item["image"][:3]


def _empty_section(doc):
    doc["test"] = []


@pytest.mark.parametrize("edit, message", [
    (_three_sequences, "wrong number of modalities: expected 4, the datalist declares 3"),
    (_empty_section, "section 'test' must be a non-empty list"),
])
def test_bad_datalists_fail_before_any_output(cohort, model, tmp_path, edit, message):
    datalist = edited_datalist(cohort, tmp_path, edit)
    out = tmp_path / "out"
    with pytest.raises(DatalistError, match=message) as err:
        segment(model, datalist, section="test", output_dir=out, num_samples=1, steps=1, device="cpu", amp="none",
                progress=False)
    assert str(datalist) in str(err.value)
    assert not out.exists()


@pytest.mark.parametrize("damage, message", [
    ("shape", "shape"),
    ("nan", "NaN"),
])
def test_bad_images_fail_naming_the_file(cohort, model, tmp_path, damage, message):
    item = json.loads(Path(cohort).read_text())["test"][0]
    copy = tmp_path / "data"
    shutil.copytree(Path(cohort).parent, copy)
    bad = copy / item["image"][2]  # t2
    img = nib.load(str(bad))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if damage == "shape":
        data = data[:, :40]
    else:
        data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(bad))
    out = tmp_path / "out"
    with pytest.raises(DatalistError, match=message) as err:
        segment(model, copy / "datalist.json", section="test", output_dir=out, num_samples=1, steps=1,
                device="cpu", amp="none", progress=False)
    assert str(bad) in str(err.value) and not out.exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "plms"}, "unknown sampler 'plms'"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"num_samples": 0}, "num_samples must be an integer >= 1"),
    ({"roi_size": (12, 16, 16)}, "roi_size .* multiples of 8"),
    ({"overlap": 1.0}, "overlap must be a finite number in"),
])
def test_bad_settings_fail_before_any_output(cohort, model, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(InputError, match=message):
        segment(model, cohort, section="test", output_dir=out, **{"num_samples": 1, "steps": 1, **kwargs},
                device="cpu", amp="none", progress=False)
    assert not out.exists()


def test_a_file_that_is_not_a_segmentation_model_is_refused(cohort, tmp_path):
    from meddiff3d.engine.checkpoint import INFERENCE_FORMAT, save_file

    path = save_file({"format": INFERENCE_FORMAT, "iteration": 0, "ema": {}, "meta": {"kind": "latent_diffusion"}},
                     tmp_path / "other.pt")
    with pytest.raises(InputError, match="not a segmentation diffusion model"):
        segment(path, cohort, output_dir=tmp_path / "out", progress=False)
