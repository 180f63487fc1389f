"""Label-free morphometry of a skull-stripped T1 volume: brain (parenchymal) and ventricular volume in mL.

Generated volumes come without tissue labels, so conditioning fidelity needs a measurement that works on the image
alone. :func:`measure_volumes` is deterministic (no random initialisation, fixed subsampling) and independent of the
intensity scale (every threshold is relative to the image's own tissue means):

1. **Brain mask**: voxels above ``BACKGROUND_FRACTION`` x the 99th intensity percentile of the non-background voxels,
   the largest connected component, holes filled (the ventricles are inside it).
2. **Tissue means**: a 3-class Gaussian mixture (scikit-learn, means initialised at the 5th / 45th / 85th intensity
   percentiles, so CSF < GM < WM) on the brain voxels (at most ``MAX_FIT_VOXELS`` of them, taken at a fixed stride).
3. **Bias correction** (``BIAS_ITERATIONS`` rounds, a light N3-like step): every confidently classified voxel
   (posterior > 0.9) gives an estimate ``intensity / mean of its class`` of the multiplicative bias field; the field
   is the Gaussian-smoothed (``BIAS_SIGMA_MM``) weighted average of these estimates, the image is divided by it and
   the mixture refitted.
4. **Parenchymal fraction** per voxel (linear partial-volume model between the CSF and GM means):
   ``f = clip((I - mu_csf) / (mu_gm - mu_csf), 0, 1)``, 0 outside the mask; CSF fraction ``c = 1 - f`` inside it.
   ``brain_ml = sum(f) * voxel volume`` -- grey + white matter, as the datalist's ``brain_volume`` is measured.
5. **Ventricles**: CSF-dominant voxels (``c > 0.5``) deeper than ``VENTRICLE_MIN_DEPTH_MM`` inside the mask, split in
   connected components; a component is ventricular when it reaches a depth of ``VENTRICLE_CORE_DEPTH`` x the
   mask's maximum depth and its centroid lies in the central box of the mask's bounding box (``VENTRICLE_BOX`` of the
   half-extent per axis). ``ventricular_ml = sum(c)`` over those components dilated by one voxel (their partial-volume
   rim) -- sulcal CSF, which reaches in from the surface, is excluded by the depth and box rules.

The method targets skull-stripped T1 in the model's geometry (the datalist and the generator's output); it is a
crude stand-in for a segmentation tool (no atlas, no topology), validated against the datalist's own covariates by
:func:`meddiff3d.evaluation.generative.validate_measurement` (that correlation is the ceiling for conditioning
fidelity). :func:`to_model_scale` / :func:`calibrate` map mL to the model's [0, 1] covariates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["measure_volumes", "to_model_scale", "Calibration", "calibrate", "MEASURED_COVARIATES",
           "BACKGROUND_FRACTION", "BIAS_SIGMA_MM", "VENTRICLE_MIN_DEPTH_MM"]

BACKGROUND_FRACTION = 0.1
MAX_FIT_VOXELS = 200_000
BIAS_ITERATIONS = 2
BIAS_SIGMA_MM = 40.0
BIAS_GRID_FACTOR = 4  # the bias field is smoothed on a grid 4x coarser per axis (see _smooth_field)
VENTRICLE_MIN_DEPTH_MM = 8.0
VENTRICLE_CORE_DEPTH = 0.3
VENTRICLE_BOX = (0.4, 0.6, 0.6)  # |centroid - centre| < box * half-extent, per axis (x, y, z)
#: covariate name -> key of :func:`measure_volumes`' result
MEASURED_COVARIATES = {"brain_volume": "brain_ml", "ventricular_volume": "ventricular_ml"}


def _brain_mask(image: np.ndarray) -> np.ndarray:
    positive = image[image > 0]
    if positive.size == 0:
        return np.zeros(image.shape, dtype=bool)
    fg = image > BACKGROUND_FRACTION * np.percentile(positive, 99)
    labels, count = ndimage.label(fg)
    if count == 0:
        return fg
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)))


def _fit_mixture(values: np.ndarray):
    from sklearn.mixture import GaussianMixture

    stride = max(1, values.size // MAX_FIT_VOXELS)
    sample = values[::stride].reshape(-1, 1)
    init = np.percentile(sample, [5, 45, 85]).reshape(-1, 1)
    gmm = GaussianMixture(3, means_init=init, random_state=0, max_iter=200).fit(sample)
    order = np.argsort(gmm.means_.ravel())
    return gmm, order


def _smooth_field(ratio: np.ndarray, weight: np.ndarray, sigma: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian smoothing (``sigma`` voxels, zeros outside) of ``ratio`` and ``weight``, evaluated on a grid coarser
    by ``BIAS_GRID_FACTOR`` (block means; the 40 mm field is far smoother than the blocks) and interpolated back
    (linear): the same field to well under a percent, ~50x faster than smoothing at full resolution."""
    f = BIAS_GRID_FACTOR
    shape = ratio.shape
    padded = [(0, (-n) % f) for n in shape]
    dims = [(n + pad) // f for n, (_, pad) in zip(shape, padded)]
    out = []
    for values in (ratio, weight):
        small = np.pad(values, padded).reshape(dims[0], f, dims[1], f, dims[2], f).mean(axis=(1, 3, 5))
        small = ndimage.gaussian_filter(small, [s_ / f for s_ in sigma], mode="constant")
        full = ndimage.zoom(small, f, order=1, grid_mode=True, mode="nearest")
        out.append(full[tuple(slice(0, n) for n in shape)])
    return out[0], out[1]


def tissue_model(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """``(bias-corrected image, class means [csf, gm, wm])`` (steps 2-3 of the module docstring)."""
    corrected = image.astype(np.float64).copy()
    sigma = [BIAS_SIGMA_MM / float(s) for s in spacing]
    for round_ in range(BIAS_ITERATIONS + 1):
        gmm, order = _fit_mixture(corrected[mask])
        means = gmm.means_.ravel()[order]
        if round_ == BIAS_ITERATIONS:
            break
        post = gmm.predict_proba(corrected[mask].reshape(-1, 1))[:, order]
        cls = post.argmax(1)
        confident = post.max(1) > 0.9
        ratio = np.zeros(image.shape)
        weight = np.zeros(image.shape)
        ratio[mask] = np.where(confident, corrected[mask] / means[cls], 0.0)
        weight[mask] = confident
        num, den = _smooth_field(ratio, weight, sigma)
        field = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 1.0)
        corrected[mask] = corrected[mask] / np.clip(field[mask], 0.5, 2.0)
    return corrected, means


def measure_volumes(image: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Brain (GM + WM) and ventricular volume in mL of a skull-stripped T1 ``image`` (3D array, any intensity
    scale) with voxel ``spacing`` in mm; also the intracranial mask volume and the tissue means (relative to WM).
    See the module docstring for the method."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 4:
        image = image[0]
    if image.ndim != 3:
        raise ValueError(f"measure_volumes needs a 3D volume, got shape {image.shape}")
    spacing = [float(s) for s in spacing]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    mask = _brain_mask(image)
    if mask.sum() < 100:
        return {"brain_ml": 0.0, "ventricular_ml": 0.0, "intracranial_ml": float(mask.sum() * voxel_ml),
                "csf_mean": float("nan"), "gm_mean": float("nan"), "valid": False}
    corrected, (mu_csf, mu_gm, mu_wm) = tissue_model(image, mask, spacing)
    frac = np.zeros(image.shape)
    frac[mask] = np.clip((corrected[mask] - mu_csf) / max(mu_gm - mu_csf, 1e-6), 0.0, 1.0)
    csf = np.where(mask, 1.0 - frac, 0.0)
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    candidates = (csf > 0.5) & (depth > VENTRICLE_MIN_DEPTH_MM)
    labels, count = ndimage.label(candidates)
    keep = np.zeros(count + 1, dtype=bool)
    if count:
        idx = np.arange(1, count + 1)
        deepest = ndimage.maximum(depth, labels, idx)
        centroids = np.asarray(ndimage.center_of_mass(candidates, labels, idx)).reshape(count, 3)
        coords = np.argwhere(mask)
        low, high = coords.min(0), coords.max(0)
        centre, half = (low + high) / 2.0, np.maximum((high - low) / 2.0, 1.0)
        central = np.all(np.abs(centroids - centre) < np.asarray(VENTRICLE_BOX) * half, axis=1)
        keep[1:] = central & (np.asarray(deepest) >= VENTRICLE_CORE_DEPTH * depth.max())
    ventricles = ndimage.binary_dilation(keep[labels]) & mask
    return {
        "brain_ml": float(frac.sum() * voxel_ml),
        "ventricular_ml": float(csf[ventricles].sum() * voxel_ml),
        "intracranial_ml": float(mask.sum() * voxel_ml),
        "csf_mean": float(mu_csf / mu_wm), "gm_mean": float(mu_gm / mu_wm),
        "valid": True,
    }


def to_model_scale(raw: Mapping[str, float], scaling: Mapping[str, Mapping]) -> dict[str, float]:
    """Measured ``{"brain_ml", "ventricular_ml", ...}`` -> model covariates ``{"brain_volume": v, ...}`` with the
    datalist's scaling block (``(raw - min) / (max - min)``, not clipped so over-range samples stay visible)."""
    out = {}
    for name, key in MEASURED_COVARIATES.items():
        s = scaling.get(name) or {}
        if key in raw and "min" in s and "max" in s:
            out[name] = (float(raw[key]) - float(s["min"])) / (float(s["max"]) - float(s["min"]))
    return out


@dataclass
class Calibration:
    """A linear map ``model-scale measurement -> datalist covariate`` per covariate (the inverted calibration curve of
    :func:`calibrate`, fitted on real volumes): removes the method's systematic bias (e.g. partial-volume voxels lost
    at the mask edge) before errors are computed."""

    slope: dict[str, float]
    intercept: dict[str, float]

    def __call__(self, measured: Mapping[str, float]) -> dict[str, float]:
        return {k: self.slope.get(k, 1.0) * v + self.intercept.get(k, 0.0) for k, v in measured.items()}

    def to_dict(self) -> dict:
        return {"slope": self.slope, "intercept": self.intercept}


def calibrate(measured: Sequence[Mapping[str, float]], truth: Sequence[Mapping[str, float]]) -> Calibration:
    """A calibration curve per covariate: least squares ``measured ~ a * truth + b`` on real volumes whose truth is
    known, inverted (``truth = (measured - b) / a``); identity with fewer than 3 pairs, no spread or no response.

    The error is in the measurement (the covariates of synthetic subjects are exact), so the measurement is regressed
    on the truth, not the other way round: regressing the truth on a noisy measurement shrinks its slope by ``r^2``
    (regression dilution), which would scale every measured change -- a paired sweep's slope -- by ``r^2`` too."""
    slope, intercept = {}, {}
    for name in MEASURED_COVARIATES:
        pairs = np.array([(m[name], t[name]) for m, t in zip(measured, truth) if name in m and name in t], dtype=float)
        if len(pairs) < 3 or np.std(pairs[:, 0]) < 1e-9 or np.std(pairs[:, 1]) < 1e-9:
            slope[name], intercept[name] = 1.0, 0.0
            continue
        a, b = np.polyfit(pairs[:, 1], pairs[:, 0], 1)
        if abs(a) < 1e-6:
            slope[name], intercept[name] = 1.0, 0.0
            continue
        slope[name], intercept[name] = float(1.0 / a), float(-b / a)
    return Calibration(slope, intercept)
