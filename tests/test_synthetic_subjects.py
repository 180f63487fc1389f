"""Synthetic subjects: determinism, covariate effects, BraTS tumours, anomaly lesions (procedural, small grids)."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from meddiff3d.data.synthetic import (
    TISSUES, anomaly_subject, brats_regions, brats_subject, healthy_subject, load_anatomy, split_of,
)
from meddiff3d.data.synthetic import deformation as dfm
from meddiff3d.data.synthetic.grid import grid_for_shape
from meddiff3d.errors import InputError

SMALL = (32, 48, 32)


@pytest.fixture(scope="module")
def anatomy():
    return load_anatomy("procedural", SMALL)


@pytest.fixture(scope="module")
def anatomy48():
    return load_anatomy("procedural", (48, 64, 48))


def test_template_maps_are_consistent(anatomy):
    maps = {name: anatomy[name] for name in TISSUES}
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in maps.values())
    assert np.all(maps["ventricles"] <= maps["csf"] + 1e-6)
    inside = maps["brain"] > 0.99
    total = maps["gm"] + maps["wm"] + maps["csf"]
    assert np.allclose(total[inside], 1.0, atol=0.02)
    assert maps["ventricles"].sum() * anatomy.grid.voxel_volume_ml > 5.0


def test_same_seed_same_subject_different_seed_differs(anatomy):
    a, b = healthy_subject(anatomy, 7, 3), healthy_subject(anatomy, 7, 3)
    assert np.array_equal(a.images["t1"], b.images["t1"]) and a.covariates_raw == b.covariates_raw
    c = healthy_subject(anatomy, 8, 3)
    assert not np.array_equal(a.images["t1"], c.images["t1"])
    assert not np.array_equal(a.images["t1"], healthy_subject(anatomy, 7, 4).images["t1"])


def test_split_depends_on_index_only():
    first = [split_of(k, 0.2, 0.3) for k in range(10)]
    assert [split_of(k, 0.2, 0.3) for k in range(40)][:10] == first
    counts = {s: [split_of(k, 0.2, 0.3) for k in range(100)].count(s) for s in ("training", "validation", "test")}
    assert abs(counts["test"] - 30) <= 2 and abs(counts["validation"] - 20) <= 2


def test_velocity_integration_is_invertible():
    grid = grid_for_shape(SMALL)
    lattice = dfm.control_lattice(grid)
    v = dfm.random_velocity(np.random.default_rng(0), lattice, 30.0, 3.0)
    forward, backward = dfm.integrate_velocity(v, lattice), dfm.integrate_velocity(-v, lattice)
    identity = dfm.compose(forward, backward, lattice)
    inner = (slice(None),) + (slice(5, -5),) * 3
    # exp(v) o exp(-v) = id up to interpolation error on the 4 mm lattice
    assert np.abs(identity[inner]).max() < 0.1 * np.abs(forward[inner]).max()
    assert dfm.jacobian_determinant(forward, lattice.spacing).min() > 0


def test_age_grows_ventricles_and_shrinks_brain(anatomy):
    for index in range(3):  # paired: the same subject at two ages
        young = healthy_subject(anatomy, 0, index, age=45).covariates_raw
        old = healthy_subject(anatomy, 0, index, age=85).covariates_raw
        assert old["ventricular_volume"] > 1.05 * young["ventricular_volume"]
        assert old["brain_volume"] < 0.93 * young["brain_volume"]
    # with the other randomness fixed (one subject, ages swept) both volumes are monotonic in age
    sweep = [healthy_subject(anatomy, 1, 0, age=age).covariates_raw for age in np.linspace(40, 90, 6)]
    assert spearmanr(np.arange(6), [c["brain_volume"] for c in sweep])[0] < -0.9
    assert spearmanr(np.arange(6), [c["ventricular_volume"] for c in sweep])[0] > 0.9


def test_ventricle_factor_moves_the_ventricles_alone_and_head_size_the_brain(anatomy):
    """Paired sweeps of one factor, the subject, age and sex fixed: ventricle enlargement 0 -> 1 multiplies the
    ventricles (> 3x) and leaves the brain within 5 %; head size 0 -> 1 grows the brain by the cubed scale range
    (1.04 / 0.87)^3 = 1.71 within 10 %."""
    for index in range(3):
        small, large = (healthy_subject(anatomy, 0, index, age=60, sex=0, ventricles=v).covariates_raw
                        for v in (0.0, 1.0))
        assert large["ventricular_volume"] > 3.0 * small["ventricular_volume"]
        assert abs(large["brain_volume"] / small["brain_volume"] - 1.0) < 0.05
        sweep = [healthy_subject(anatomy, 0, index, age=60, sex=0, head_size=h).covariates_raw
                 for h in np.linspace(0, 1, 5)]
        volumes = [c["brain_volume"] for c in sweep]
        assert np.all(np.diff(volumes) > 0) and volumes[-1] / volumes[0] == pytest.approx(1.71, rel=0.1)
    with pytest.raises(InputError, match="ventricle enlargement 1.5"):
        healthy_subject(anatomy, 0, 0, ventricles=1.5)


def test_sex_scales_brain(anatomy):
    female = healthy_subject(anatomy, 0, 0, age=60, sex=0).covariates_raw["brain_volume"]
    male = healthy_subject(anatomy, 0, 0, age=60, sex=1).covariates_raw["brain_volume"]
    assert 1.05 < male / female < 1.15


def test_cohort_covariates_are_independent_and_cover_their_ranges(tmp_path, capsys):
    """64 subjects (procedural, 32x48x32): no two covariates correlate by more than |r| = 0.5 (before the covariates
    were drawn independently, age and ventricular volume correlated at 0.94 and the ventricles spanned 0.20-0.51 of
    their range), each covers >= 60 % of its documented range, and ``synth`` prints and records the matrix."""
    from meddiff3d.data.synthetic import cli

    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    cli.run(parser.parse_args(["healthy", "--n", "64", "--out", str(tmp_path / "c"), "--shape", "32", "48", "32",
                               "--source", "procedural", "--no-progress"]))
    printed = capsys.readouterr().out
    summary = __import__("json").loads((tmp_path / "c" / "datalist.json").read_text())["synthetic"]["covariate_summary"]
    print(printed)
    assert summary["n"] == 64 and summary["names"] == ["age", "sex", "brain_volume", "ventricular_volume"]
    corr = np.array(summary["correlation"], dtype=float)
    off_diagonal = np.abs(corr[~np.eye(4, dtype=bool)])
    assert off_diagonal.max() <= 0.5, corr
    assert all(r["share_of_range"] >= 0.6 for r in summary["ranges"].values()), summary["ranges"]
    assert "correlation (Pearson r)" in printed and f"{corr[0, 3]:+.2f}" in printed


def test_brats_subject_labels_regions_and_contrasts(anatomy48):
    for index in range(3):
        subject = brats_subject(anatomy48, 0, index)
        label = subject.label
        assert set(np.unique(label)) <= {0, 1, 2, 4} and {2, 4} <= set(np.unique(label))
        regions = brats_regions(label)
        assert np.all(regions["ET"] <= regions["TC"]) and np.all(regions["TC"] <= regions["WT"])
        assert np.all(subject.maps[TISSUES.index("brain")][regions["WT"]] > 0.5)
        images = subject.images
        assert list(images) == ["t1", "t1ce", "t2", "flair"]
        wm = (subject.maps[TISSUES.index("wm")] > 0.8) & ~regions["WT"]
        gm = (subject.maps[TISSUES.index("gm")] > 0.8) & ~regions["WT"]
        csf = (subject.maps[TISSUES.index("csf")] > 0.8) & ~regions["WT"]
        mean = {s: {"wm": images[s][wm].mean(), "gm": images[s][gm].mean(), "csf": images[s][csf].mean(),
                    "ed": images[s][label == 2].mean(), "et": images[s][label == 4].mean()} for s in images}
        assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"]
        assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"]
        assert mean["flair"]["csf"] < mean["flair"]["wm"] < mean["flair"]["ed"]
        assert mean["t1ce"]["et"] > mean["t1ce"]["wm"] > mean["t1"]["et"]
        assert np.all(images["flair"][subject.maps[TISSUES.index("brain")] <= 0.5] == 0)  # skull-stripped


def test_anomaly_masks(anatomy):
    for kind in ("tumour", "multifocal", "dark"):
        subject = anomaly_subject(anatomy, 0, 2, kind)
        assert subject.label.dtype == np.uint8 and subject.label.sum() > 0
        assert np.all(subject.maps[TISSUES.index("brain")][subject.label > 0] > 0.5)
        assert subject.extra["lesion_kind"] == kind
    healthy = anomaly_subject(anatomy, 0, 2, "none")
    assert healthy.label.sum() == 0
    # same subject: the healthy anomaly-set volume is the healthy-cohort volume
    assert np.array_equal(healthy.images["t1"], healthy_subject(anatomy, 0, 2).images["t1"])
    dark = anomaly_subject(anatomy, 0, 2, "dark")
    bright = anomaly_subject(anatomy, 0, 2, "multifocal")
    assert dark.images["t1"][dark.label > 0].mean() < healthy.images["t1"][dark.label > 0].mean()
    assert bright.images["t1"][bright.label > 0].mean() > healthy.images["t1"][bright.label > 0].mean()
    with pytest.raises(InputError, match="lesion kind"):
        anomaly_subject(anatomy, 0, 2, "cyst")


def test_mni_source_small():
    anatomy = load_anatomy("mni", SMALL)
    volumes = {n: anatomy[n].sum() * anatomy.grid.voxel_volume_ml for n in ("gm", "wm", "ventricles", "brain")}
    assert 1500 < volumes["brain"] < 2100 and 5 < volumes["ventricles"] < 40
    young = healthy_subject(anatomy, 0, 0, age=45).covariates_raw
    old = healthy_subject(anatomy, 0, 0, age=85).covariates_raw
    assert old["ventricular_volume"] > young["ventricular_volume"]
    assert old["brain_volume"] < young["brain_volume"]
    subject = brats_subject(anatomy, 0, 0)
    regions = brats_regions(subject.label)
    assert regions["ET"].any() and np.all(regions["TC"] <= regions["WT"])
