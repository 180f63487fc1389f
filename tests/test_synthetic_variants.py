"""Synthetic acquisition variants: domain randomisation keeps labels aligned with the images, thick slices blur one
axis only, the out-of-template families (torque warp, off-range contrast, phantom) are what they say (procedural and
MNI152 anatomy on small grids)."""

import json

import numpy as np
import pytest

from meddiff3d.data.synthetic import TISSUES, brats_subject, healthy_subject, load_anatomy, write_cohort
from meddiff3d.data.synthetic.acquisition import draw_acquisition, thick_slices
from meddiff3d.data.synthetic.contrast import TISSUE_INTENSITY
from meddiff3d.data.synthetic.grid import grid_for_shape
from meddiff3d.errors import InputError

SHAPE = (48, 64, 48)


@pytest.fixture(scope="module")
def anatomy():
    return load_anatomy("procedural", SHAPE)


def class_map(subject) -> np.ndarray:
    """0 outside the brain, tissue classes 1-3 (GM, WM, CSF by the largest fraction), tumour labels 4-6."""
    maps = subject.maps
    tissue = np.argmax(maps[[TISSUES.index(t) for t in ("gm", "wm", "csf")]], axis=0) + 1
    classes = np.where(maps[TISSUES.index("brain")] > 0.5, tissue, 0)
    for value, label in ((4, 1), (5, 2), (6, 4)):
        classes[subject.label == label] = value
    return classes


def piecewise_fit(image: np.ndarray, classes: np.ndarray) -> float:
    """Pearson r between the image and the image with every voxel replaced by its class mean."""
    means = np.zeros(classes.max() + 1)
    for c in np.unique(classes):
        means[c] = image[classes == c].mean()
    return float(np.corrcoef(image.ravel(), means[classes].ravel())[0, 1])


def test_contrast_randomisation_keeps_labels_aligned(anatomy):
    """A ``varied`` BraTS subject's four sequences are explained by its own label/tissue map (class means, r > 0.8),
    with less than half the unexplained variance of the same map shifted by 3 voxels; its covariates are the
    standard subject's (rotation keeps volumes), its head is rotated (brain masks differ), and its contrasts are not
    the standard ones."""
    standard, varied = (brats_subject(anatomy, 0, 1, variant=v) for v in ("standard", "varied"))
    classes = class_map(varied)
    shifted = np.roll(classes, 3, axis=0)
    for sequence, image in varied.images.items():
        aligned, misaligned = piecewise_fit(image, classes), piecewise_fit(image, shifted)
        assert aligned > 0.8 and 1 - misaligned**2 > 2 * (1 - aligned**2), (sequence, aligned, misaligned)
    for name in ("brain_volume", "ventricular_volume"):
        assert varied.covariates_raw[name] == pytest.approx(standard.covariates_raw[name], rel=0.03)
    brain = [s.maps[TISSUES.index("brain")] > 0.5 for s in (standard, varied)]
    assert 2 * (brain[0] & brain[1]).sum() / (brain[0].sum() + brain[1].sum()) < 0.99
    ratios = [s.images["t1"][class_map(s) == 1].mean() / s.images["t1"][class_map(s) == 2].mean()
              for s in (standard, varied)]
    assert abs(ratios[0] - ratios[1]) > 0.01


def test_varied_contrasts_keep_t1_tissue_order_and_out_of_template_leaves_the_range():
    """Over 200 draws: the effective T1 grey/white ratio ``(gm / wm) ** gamma`` of ``varied`` images stays in
    [0.53, 0.88] (WM > GM > CSF always); every ``contrast`` image lies outside it (<= 0.45 or >= 0.89)."""
    def effective(variant, k):
        mu, scanner = draw_acquisition(np.random.default_rng(k), "t1", TISSUE_INTENSITY["t1"], variant)
        assert mu["wm"] > mu["gm"] > mu["csf"] > 0
        return (mu["gm"] / mu["wm"]) ** scanner.gamma

    varied = np.array([effective("varied", k) for k in range(200)])
    off = np.array([effective("contrast", k) for k in range(200)])
    assert varied.min() >= 0.5 and varied.max() <= 0.89, (varied.min(), varied.max())
    assert np.all((off <= 0.46) | (off >= 0.89)) and (off < 0.5).any() and (off > 0.88).any()


def test_thick_slices_blur_one_axis_and_keep_the_mean():
    grid = grid_for_shape((32, 32, 32))
    image = np.zeros((32, 32, 32), np.float32)
    image[:, :, 16:] = 1.0  # an edge across z
    image[16:, :, :] += 1.0  # an edge across x
    out = thick_slices(image, grid, axis=2, slice_mm=5 * float(grid.spacing[2]))
    assert np.allclose(out[:, :, :6], image[:, :, :6]) and np.allclose(out[:, :, 27:], image[:, :, 27:])
    assert np.allclose(out[16] - out[15], 1.0)  # the x edge stays sharp
    assert 0.0 < out[0, 0, 15] < 1.0  # the z edge is spread over several slices
    assert out.mean() == pytest.approx(image.mean(), abs=0.02)
    assert thick_slices(image, grid, axis=0, slice_mm=0.5 * float(grid.spacing[0])) is image


def test_asymmetric_family_shears_the_hemispheres():
    """Torque: relative to the standard subject, the right hemisphere's centre moves forward and the left one's
    backward (RAS: +y anterior), by millimetres; the covariates stay within a few per cent."""
    anatomy = load_anatomy("mni", (40, 56, 40))
    grid = anatomy.grid
    x, y = grid.axes()[0], grid.axes()[1]

    def hemisphere_y(subject, right):
        brain = subject.maps[TISSUES.index("gm")] + subject.maps[TISSUES.index("wm")]
        side = (x > 5.0) if right else (x < -5.0)
        w = brain * side[:, None, None]
        return float((w * y[None, :, None]).sum() / w.sum())

    standard, torqued = (healthy_subject(anatomy, 0, 2, variant=v) for v in ("standard", "asymmetric"))
    forward = hemisphere_y(torqued, True) - hemisphere_y(standard, True)
    backward = hemisphere_y(torqued, False) - hemisphere_y(standard, False)
    assert forward > 1.5 and backward < -1.5, (forward, backward)
    assert torqued.covariates_raw["brain_volume"] == pytest.approx(standard.covariates_raw["brain_volume"], rel=0.05)


def test_out_of_template_cohort_cycles_the_families(tmp_path):
    summary = write_cohort("anomaly", tmp_path / "ood", n=6, shape=(32, 48, 32), source="procedural",
                           val_fraction=0.0, test_fraction=1.0, progress=False, variant="out_of_template")
    doc = json.loads(summary.datalist.read_text())
    assert [item["variant"] for item in doc["test"]] == ["asymmetric", "contrast", "phantom"] * 2
    assert doc["synthetic"]["variant"] == "out_of_template"
    assert {item["lesion_kind"] for item in doc["test"]} == {"tumour", "multifocal", "dark", "none"}
    with pytest.raises(InputError, match="variant 'odd'"):
        write_cohort("healthy", tmp_path / "x", n=1, variant="odd", progress=False)
    assert not (tmp_path / "x").exists()


def test_each_item_records_how_its_image_was_acquired(tmp_path):
    """The datalist item of a ``varied`` subject holds what its image drew (gamma, bias, noise, slices and the tissue
    intensities), equal to a regeneration of the subject, and the record describes the image: over 12 subjects the
    grey/white median ratio follows the recorded ``(gm / wm) ** gamma`` (each within 16 %, r > 0.7; the unrecorded
    bias field and texture make the rest)."""
    summary = write_cohort("healthy", tmp_path / "c", n=3, shape=(32, 48, 32), source="procedural", progress=False,
                           variant="varied")
    doc = json.loads(summary.datalist.read_text())
    anatomy = load_anatomy("procedural", (32, 48, 32))
    for item in [*doc["training"], *doc["validation"]]:
        regenerated = healthy_subject(anatomy, 0, item["index"], variant="varied")
        assert item["acquisition"]["t1"] == regenerated.acquisition["t1"]
    measured, predicted, gammas = [], [], set()
    for index in range(12):
        subject = healthy_subject(anatomy, 0, index, variant="varied")
        record = subject.acquisition["t1"]
        assert 0.8 <= record["gamma"] <= 1.25 and 0.005 <= record["noise_sigma"] <= 0.06
        assert record["slice_axis"] in (-1, 0, 1, 2) and set(record["intensities"]) == {"gm", "wm", "csf"}
        wm, gm = (subject.maps[TISSUES.index(t)] > q for t, q in (("wm", 0.95), ("gm", 0.9)))
        image = subject.images["t1"]
        measured.append(float(np.median(image[gm]) / np.median(image[wm])))
        predicted.append((record["intensities"]["gm"] / record["intensities"]["wm"]) ** record["gamma"])
        gammas.add(record["gamma"])
    np.testing.assert_allclose(measured, predicted, rtol=0.16)
    assert np.corrcoef(measured, predicted)[0, 1] > 0.7 and len(gammas) == 12  # drawn per subject
    standard = healthy_subject(anatomy, 0, 0).acquisition["t1"]
    assert standard["gamma"] == 1.0 and standard["slice_axis"] == -1 and standard["slice_mm"] == 0
    # every item of a lesioned cohort records the same keys: the items still collate into a batch
    from monai.data import list_data_collate

    lesioned = write_cohort("anomaly", tmp_path / "a", n=8, shape=(32, 48, 32), source="procedural", progress=False,
                            val_fraction=0.0, test_fraction=1.0, variant="varied")
    items = json.loads(lesioned.datalist.read_text())["test"]
    assert len({item["lesion_kind"] for item in items}) == 4
    batch = list_data_collate([{"acquisition": item["acquisition"]} for item in items])
    assert batch["acquisition"]["t1"]["gamma"].shape == (8,)
