"""One synthetic subject: covariates -> deformed anatomy -> lesions -> MR images, deterministic by (seed, index).

Randomness: subject ``index`` of a cohort with ``seed`` draws from independent streams
``np.random.SeedSequence(seed, spawn_key=(index, stream))`` -- ``anatomy`` (covariates, size, deformation),
``contrast`` (intensities, texture, bias, noise), ``lesion`` and ``variant`` (head rotation, asymmetric warp:
:mod:`.acquisition`) -- so subject ``k`` is the same whatever the cohort size, the lesioned and healthy versions of
subject ``k`` share anatomy and scanner draws, and its variants share its covariates and individual shape.

Covariate model (the "known answers"). Age, sex, ventricle enlargement and head size are drawn independently from the
``anatomy`` stream, so every covariate can vary with the others held fixed; ``a = (age - 40) / 50`` runs from 0 at 40
to 1 at 90 years:

* ventricles: velocity ``(VENTRICLE_MM[0] + v * span + a * AGE_VENTRICLE_MM) * ventricle_field`` with the subject's
  own enlargement factor ``v ~ U(0, 1)`` (pulls the warp into the ventricles, or out of them below 0; the surrounding
  white matter is compressed, the outer brain stays in place); age adds a smaller share, as in real ageing;
* cortex thins: ``a * CORTICAL_THINNING_MM`` of grey matter is turned into CSF from the pial side;
* the brain shrinks inside the skull: GM, WM and ventricles are scaled by ``1 - a * BRAIN_SHRINK`` about the brain
  centre while the intracranial mask, skull and scalp are not; the freed space becomes CSF (``csf = brain - gm - wm``);
* head size: the head is scaled by the subject's own factor, log-uniform in ``HEAD_SCALE`` (brain volume x 0.78 to
  x 1.26), times x 0.984 (female, 0) / x 1.016 (male, 1);
* individual shape: a smooth random velocity (30 mm correlation, 1.5 mm per component).

With these ranges, on the MNI152 source at 1 mm, single subjects reach ventricular volumes of 6-84 mL and brain
volumes of 800-1820 mL at the extremes of the factors; the 256-subject demo cohort spans 7.7-80.4 mL and
881-1917 mL, and its largest correlation is age with brain volume (-0.32: age shrinks the brain). ``synth`` prints
the matrix of every cohort it writes; tests/test_synthetic_subjects.py bounds |r| <= 0.5.

The velocities are summed and integrated by scaling and squaring (a diffeomorphism), the template tissue maps are
warped once, and the recorded volumes are **measured on the warped maps**: ``brain_volume`` = sum(GM + WM) and
``ventricular_volume`` = sum(ventricles), in mL (partial volumes times voxel volume).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from meddiff3d.errors import InputError

from . import deformation as dfm
from .acquisition import VARIANTS, rotation_velocity, torque_velocity
from .anatomy import TISSUES, Anatomy
from .contrast import SEQUENCES, synthesise
from .lesions import brats_regions, focal_lesions, plan_tumour, tumour_label

AGE_RANGE = (40.0, 90.0)
VENTRICLE_MM = (-3.0, 15.0)  # the enlargement velocity at v = 0 and v = 1 (peak, mm)
AGE_VENTRICLE_MM = 4.0  # added at 90 years
CORTICAL_THINNING_MM = 0.8
BRAIN_SHRINK = 0.03
HEAD_SCALE = (0.87, 1.04)
SEX_SCALE = {0: 0.984, 1: 1.016}
BRAIN_CENTRE_MM = (0.0, -18.0, 10.0)
LESION_KINDS = ("none", "tumour", "multifocal", "dark")
STREAMS = {"anatomy": 0, "contrast": 1, "lesion": 2, "variant": 3}


@dataclass
class Subject:
    """A generated subject: images per modality, optional label map, covariates (raw units), warped tissue maps."""

    id: str
    images: dict[str, np.ndarray]
    covariates_raw: dict[str, float]
    maps: np.ndarray  # (len(TISSUES), *shape) warped template maps (tumour / lesions not removed)
    label: np.ndarray | None = None
    extra: dict = field(default_factory=dict)
    acquisition: dict = field(default_factory=dict)  # sequence -> what its image drew (contrast.acquisition_record)


def subject_id(index: int) -> str:
    return f"sub-{index:04d}"


def subject_rng(seed: int, index: int, stream: str) -> np.random.Generator:
    """The generator of one stream (``anatomy``, ``contrast``, ``lesion``) of subject ``index``."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index), STREAMS[stream])))


def _deformed_anatomy(anatomy: Anatomy, seed: int, index: int, age: float | None, sex: int | None,
                      push: np.ndarray | None = None, ventricles: float | None = None,
                      head_size: float | None = None, variant: str = "standard") -> tuple[np.ndarray, dict[str, float]]:
    """Warped tissue maps and the covariates (age, sex, measured volumes) of subject ``index``.

    ``age``, ``sex``, ``ventricles`` (the enlargement factor ``v`` in [0, 1]) and ``head_size`` (in [0, 1], log-
    uniform position in :data:`HEAD_SCALE`) override the subject's own draws; everything else stays the same.
    """
    if variant not in VARIANTS:
        raise InputError(f"synthetic subject variant {variant!r} is unknown; choose one of {list(VARIANTS)}")
    rng = subject_rng(seed, index, "anatomy")
    drawn_age, drawn_sex = float(rng.uniform(*AGE_RANGE)), int(rng.random() < 0.5)
    drawn_ventricles, drawn_head = float(rng.random()), float(rng.random())
    age = drawn_age if age is None else float(age)
    sex = drawn_sex if sex is None else int(sex)
    if sex not in SEX_SCALE:
        raise InputError(f"synthetic subject sex {sex!r}: use 0 (female) or 1 (male)")
    v = drawn_ventricles if ventricles is None else float(ventricles)
    h = drawn_head if head_size is None else float(head_size)
    for name, value in (("ventricle enlargement", v), ("head size", h)):
        if not 0.0 <= value <= 1.0:
            raise InputError(f"synthetic subject {name} {value}: must be within [0, 1]")
    a = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    head_scale = float(np.exp(np.log(HEAD_SCALE[0]) + h * np.log(HEAD_SCALE[1] / HEAD_SCALE[0])))
    ventricle_mm = VENTRICLE_MM[0] + v * (VENTRICLE_MM[1] - VENTRICLE_MM[0]) + a * AGE_VENTRICLE_MM
    grid = anatomy.grid
    lattice = dfm.control_lattice(grid)
    velocity = dfm.random_velocity(rng, lattice, correlation_mm=30.0, amplitude_mm=1.5)
    velocity += ventricle_mm * anatomy.ventricle_field
    velocity += dfm.scaling_velocity(lattice, SEX_SCALE[sex] * head_scale, BRAIN_CENTRE_MM)
    if variant in ("varied", "asymmetric"):
        extra = rotation_velocity if variant == "varied" else torque_velocity
        velocity += extra(subject_rng(seed, index, "variant"), lattice, BRAIN_CENTRE_MM)
    head = dfm.integrate_velocity(velocity, lattice)
    if push is not None:
        head = dfm.compose(head, dfm.integrate_velocity(push, lattice), lattice)
    shrink = dfm.integrate_velocity(dfm.scaling_velocity(lattice, 1.0 - a * BRAIN_SHRINK, BRAIN_CENTRE_MM), lattice)
    parenchyma = dfm.compose(head, shrink, lattice)
    gm, wm, csf, ventricles = (TISSUES.index(name) for name in ("gm", "wm", "csf", "ventricles"))
    inner = anatomy.maps[[gm, wm, ventricles]].copy()
    thinning = max(a, 0.0) * CORTICAL_THINNING_MM
    if thinning > 0:
        step = float(grid.spacing.mean())
        inner[0] -= inner[0] * np.clip((thinning - anatomy.depth_mm) / step, 0.0, 1.0)
    outer_channels = [TISSUES.index(name) for name in ("brain", "skull", "scalp")]
    maps = np.empty_like(anatomy.maps)
    maps[[gm, wm, ventricles]] = dfm.warp(inner, grid, dfm.upsample_displacement(parenchyma, lattice, grid))
    maps[outer_channels] = dfm.warp(anatomy.maps[outer_channels], grid, dfm.upsample_displacement(head, lattice, grid))
    maps[csf] = np.clip(maps[TISSUES.index("brain")] - maps[gm] - maps[wm], 0.0, 1.0)
    maps[ventricles] = np.minimum(maps[ventricles], maps[csf])
    ml = grid.voxel_volume_ml
    covariates = {
        "age": age,
        "sex": float(sex),
        "brain_volume": float((maps[0] + maps[1]).sum(dtype=np.float64) * ml),
        "ventricular_volume": float(maps[TISSUES.index("ventricles")].sum(dtype=np.float64) * ml),
    }
    return maps, covariates


def _tissue_fractions(maps: np.ndarray, skull_strip: bool, replaced: np.ndarray | None = None) -> dict[str, np.ndarray]:
    keep = 1.0 if replaced is None else 1.0 - replaced
    fractions = {name: maps[TISSUES.index(name)] * keep for name in ("gm", "wm", "csf")}
    if not skull_strip:
        fractions["skull"] = maps[TISSUES.index("skull")]
        fractions["scalp"] = maps[TISSUES.index("scalp")]
    return fractions


def _images(fractions, sequences, seed, index, anatomy, brain, skull_strip, variant="standard"):
    """Images per sequence and, per sequence, how it was acquired (drawn intensities, gamma, bias, noise, slices)."""
    rng = subject_rng(seed, index, "contrast")
    strip = brain if skull_strip else None
    drawn = {seq: synthesise(fractions, seq, rng, anatomy.grid, brain=strip, variant=variant) for seq in sequences}
    return {seq: image for seq, (image, _) in drawn.items()}, {seq: record for seq, (_, record) in drawn.items()}


def healthy_subject(anatomy: Anatomy, seed: int, index: int, age: float | None = None, sex: int | None = None,
                    skull_strip: bool = True, ventricles: float | None = None,
                    head_size: float | None = None, variant: str = "standard") -> Subject:
    """A healthy T1 subject; ``age``, ``sex``, ``ventricles`` and ``head_size`` override the drawn factors
    (:func:`_deformed_anatomy`; everything else stays the same: paired sweeps of one covariate); ``variant`` as in
    :mod:`.acquisition`."""
    maps, covariates = _deformed_anatomy(anatomy, seed, index, age, sex, ventricles=ventricles, head_size=head_size,
                                         variant=variant)
    brain = maps[TISSUES.index("brain")]
    images, acquisition = _images(_tissue_fractions(maps, skull_strip), ("t1",), seed, index, anatomy, brain,
                                  skull_strip, variant)
    return Subject(subject_id(index), images, covariates, maps, acquisition=acquisition)


def _tumour_subject(anatomy, seed, index, age, sex, variant):
    rng = subject_rng(seed, index, "lesion")
    plan = plan_tumour(rng, anatomy.depth_mm, anatomy.grid)
    lattice = dfm.control_lattice(anatomy.grid)
    push = dfm.radial_push_velocity(lattice, plan.centre_mm, plan.core_radius_mm, plan.push_mm)
    maps, covariates = _deformed_anatomy(anatomy, seed, index, age, sex, push=push, variant=variant)
    brain = maps[TISSUES.index("brain")]
    label = tumour_label(rng, plan, anatomy.grid, brain, maps[0] + maps[1])
    return maps, covariates, label, plan


def _tumour_fractions(maps, label, skull_strip):
    parts = {"ncr": (label == 1), "ed": (label == 2), "et": (label == 4)}
    parts = {name: mask.astype(np.float32) for name, mask in parts.items()}
    replaced = parts["ncr"] + parts["ed"] + parts["et"]
    return {**_tissue_fractions(maps, skull_strip, replaced), **parts}


def brats_subject(anatomy: Anatomy, seed: int, index: int, age: float | None = None, sex: int | None = None,
                  skull_strip: bool = True, variant: str = "standard") -> Subject:
    """A BraTS-like subject: t1, t1ce, t2, flair and a BraTS 2021 label map (1 NCR, 2 ED, 4 ET)."""
    maps, covariates, label, plan = _tumour_subject(anatomy, seed, index, age, sex, variant)
    fractions = _tumour_fractions(maps, label, skull_strip)
    images, acquisition = _images(fractions, SEQUENCES, seed, index, anatomy, maps[TISSUES.index("brain")],
                                  skull_strip, variant)
    regions = brats_regions(label)
    ml = anatomy.grid.voxel_volume_ml
    extra = {"tumour_centre_mm": [round(float(c), 2) for c in plan.centre_mm],
             "tumour_volumes_ml": {name: round(float(mask.sum()) * ml, 3) for name, mask in regions.items()}}
    return Subject(subject_id(index), images, covariates, maps, label=label, extra=extra, acquisition=acquisition)


def anomaly_subject(anatomy: Anatomy, seed: int, index: int, lesion_kind: str = "none", age: float | None = None,
                    sex: int | None = None, skull_strip: bool = True, variant: str = "standard") -> Subject:
    """A T1 subject with a lesion of ``lesion_kind`` and its binary mask (uint8; empty for ``"none"``).

    Kinds: ``none`` (healthy), ``tumour`` (mass with necrosis/rim/oedema and mass effect; mask = whole tumour),
    ``multifocal`` (3-8 small hyperintense foci in white matter), ``dark`` (1-3 hypointense CSF-like lesions).
    """
    if lesion_kind not in LESION_KINDS:
        raise InputError(f"synthetic lesion kind {lesion_kind!r} is unknown; choose one of {list(LESION_KINDS)}")
    if lesion_kind == "tumour":
        maps, covariates, label, _ = _tumour_subject(anatomy, seed, index, age, sex, variant)
        fractions = _tumour_fractions(maps, label, skull_strip)
        mask = label > 0
    else:
        maps, covariates = _deformed_anatomy(anatomy, seed, index, age, sex, variant=variant)
        mask = np.zeros(anatomy.grid.shape, dtype=bool)
        fractions = _tissue_fractions(maps, skull_strip)
        if lesion_kind != "none":
            rng = subject_rng(seed, index, "lesion")
            if lesion_kind == "multifocal":
                allowed = maps[TISSUES.index("wm")] > 0.5
                mask = focal_lesions(rng, anatomy.grid, allowed, int(rng.integers(3, 9)), (2.5, 6.0))
            else:
                allowed = (maps[0] + maps[1]) > 0.5
                mask = focal_lesions(rng, anatomy.grid, allowed, int(rng.integers(1, 4)), (4.0, 10.0))
            lesion = mask.astype(np.float32)
            fractions = {**_tissue_fractions(maps, skull_strip, lesion),
                         ("bright" if lesion_kind == "multifocal" else "dark"): lesion}
    images, acquisition = _images(fractions, ("t1",), seed, index, anatomy, maps[TISSUES.index("brain")],
                                  skull_strip, variant)
    extra = {"lesion_kind": lesion_kind, "lesion_volume_ml": round(float(mask.sum()) * anatomy.grid.voxel_volume_ml, 3)}
    return Subject(subject_id(index), images, covariates, maps, label=mask.astype(np.uint8), extra=extra,
                   acquisition=acquisition)
