"""MR contrasts from tissue maps: per-sequence tissue intensities, bias field, Rician noise.

An image is the partial-volume mixture ``sum_k p_k * mu_k`` over the tissue/lesion fractions ``p_k`` (from
:mod:`.anatomy` and :mod:`.lesions`), modulated by a faint tissue texture and a smooth multiplicative bias field, with
Rician noise added (magnitude of a complex signal with Gaussian noise of standard deviation ``sigma`` per channel).
Intensities are arbitrary units with normal-appearing T1 white matter near 0.85; :data:`TISSUE_INTENSITY` is the
table, chosen to follow the textbook contrasts:

* T1: WM > GM > CSF; tumour hypointense, necrosis darkest; skull dark, scalp (fat) bright.
* T1ce: like T1, plus an enhancing tumour rim brighter than anything else in the brain.
* T2: CSF brightest, GM > WM; oedema and necrosis bright.
* FLAIR: CSF suppressed (dark); oedema brightest.

Lesion classes of the anomaly sets: ``bright`` (hyperintense foci) and ``dark`` (hypointense, CSF-like) lesions.
Skull-stripped images (the BraTS convention) are zero outside the brain mask, noise included.
"""

from __future__ import annotations

import numpy as np

from meddiff3d.data.brats import BRATS_MODALITIES

from .acquisition import Scanner, apply_gamma, draw_acquisition, thick_slices
from .grid import Grid, smooth_noise

#: the classes whose intensities an item's ``acquisition`` records (present in every subject of a cohort)
RECORDED_CLASSES = ("gm", "wm", "csf", "skull", "scalp")
SEQUENCES = BRATS_MODALITIES  # the BraTS sequences, t1 first (also the healthy T1 cohorts' one sequence)
# tissue or lesion class -> mean intensity per sequence
TISSUE_INTENSITY = {
    "t1": {"gm": 0.60, "wm": 0.85, "csf": 0.20, "skull": 0.08, "scalp": 0.75,
           "ncr": 0.22, "et": 0.50, "ed": 0.48, "bright": 1.15, "dark": 0.22},
    "t1ce": {"gm": 0.62, "wm": 0.85, "csf": 0.22, "skull": 0.08, "scalp": 0.80,
             "ncr": 0.24, "et": 1.30, "ed": 0.50, "bright": 1.15, "dark": 0.24},
    "t2": {"gm": 0.55, "wm": 0.40, "csf": 1.00, "skull": 0.05, "scalp": 0.60,
           "ncr": 0.95, "et": 0.65, "ed": 0.85, "bright": 0.90, "dark": 0.90},
    "flair": {"gm": 0.60, "wm": 0.45, "csf": 0.10, "skull": 0.05, "scalp": 0.65,
              "ncr": 0.40, "et": 0.75, "ed": 1.00, "bright": 1.00, "dark": 0.15},
}


def draw_intensities(rng: np.random.Generator, sequence: str, jitter: float = 0.05) -> dict[str, float]:
    """Per-subject tissue intensities: the table times a global gain and a small per-class jitter."""
    gain = float(np.exp(0.1 * rng.standard_normal()))
    table = TISSUE_INTENSITY[sequence]
    factors = 1.0 + jitter * rng.standard_normal(len(table))
    return {name: gain * value * float(f) for (name, value), f in zip(table.items(), factors)}


def bias_field(rng: np.random.Generator, grid: Grid, strength: float = 0.15, correlation_mm: float = 90.0) -> np.ndarray:
    """A smooth multiplicative field ``exp(strength * g)``, ``g`` a unit-variance random field (long correlation)."""
    return np.exp(strength * smooth_noise(rng, grid, correlation_mm)[0]).astype(np.float32)


def add_rician_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Magnitude of ``image + n1 + i n2`` with ``n1, n2 ~ N(0, sigma^2)``: Rician inside, Rayleigh in the background."""
    real = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    imag = rng.standard_normal(image.shape, dtype=np.float32) * sigma
    return np.sqrt(real * real + imag * imag)


def synthesise(fractions: dict[str, np.ndarray], sequence: str, rng: np.random.Generator, grid: Grid,
               brain: np.ndarray | None = None, noise_sigma: float | None = None,
               bias_strength: float = 0.15, texture: float = 0.03,
               variant: str = "standard") -> tuple[np.ndarray, dict]:
    """One MR image from class fractions (``{class: (*shape) array}``, classes of :data:`TISSUE_INTENSITY`).

    Draws the subject's intensities, a texture (``texture`` relative amplitude, 6 mm correlation), a bias field and
    Rician noise (``noise_sigma``, default drawn in [0.01, 0.04]) from ``rng``; a ``variant`` other than
    ``standard`` draws its own intensities, gamma, bias strength, noise and slice thickness
    (:mod:`.acquisition`). With ``brain`` given the image is skull-stripped: multiplied by ``brain > 0.5`` at the
    end. Returns the float32 ``(*shape)`` image and what was drawn for it (:func:`acquisition_record`).
    """
    if variant in ("varied", "contrast"):
        mu, scanner = draw_acquisition(rng, sequence, TISSUE_INTENSITY[sequence], variant)
    else:  # standard, and the families that change the anatomy only
        mu, scanner = draw_intensities(rng, sequence), Scanner(bias_strength=bias_strength, noise_sigma=noise_sigma)
    image = np.zeros(grid.shape, dtype=np.float32)
    for name, fraction in fractions.items():
        image += mu[name] * fraction
    image *= 1.0 + texture * smooth_noise(rng, grid, 6.0)[0]
    image = apply_gamma(image, scanner.gamma, mu["wm"])
    image *= bias_field(rng, grid, scanner.bias_strength)
    if scanner.slice_axis is not None:
        image = thick_slices(image, grid, scanner.slice_axis, scanner.slice_mm)
    sigma = float(rng.uniform(0.01, 0.04)) if scanner.noise_sigma is None else scanner.noise_sigma
    image = add_rician_noise(image, rng, sigma)
    record = acquisition_record({n: mu[n] for n in RECORDED_CLASSES if n in fractions}, scanner, sigma)
    if brain is not None:
        image *= brain > 0.5
    return image.astype(np.float32), record


def acquisition_record(intensities: dict[str, float], scanner: Scanner, noise_sigma: float) -> dict:
    """How one synthetic image was acquired, for its datalist item: the tissue intensities before gamma, bias and
    noise (white matter ~0.65-1), the gamma, bias strength, Rician noise sigma and thick-slice axis / thickness
    (``slice_axis`` -1 and ``slice_mm`` 0: the grid's own slices). Numbers only and the same keys for every item of
    a cohort (the healthy tissue classes, not the lesions), so that items still collate into batches."""
    return {"intensities": {name: round(float(v), 4) for name, v in intensities.items()},
            "gamma": round(float(scanner.gamma), 4), "bias_strength": round(float(scanner.bias_strength), 4),
            "noise_sigma": round(float(noise_sigma), 4),
            "slice_axis": -1 if scanner.slice_axis is None else int(scanner.slice_axis),
            "slice_mm": round(float(scanner.slice_mm), 3)}
