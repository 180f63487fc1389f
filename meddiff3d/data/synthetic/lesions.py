"""Lesions with known masks: BraTS-like tumours (necrosis, enhancing rim, oedema) and small focal lesions.

BraTS 2021 label convention (written in the label maps, ``label_convention: "brats2021"`` in the datalist)::

    0 background, 1 NCR (necrotic tumour core), 2 ED (peritumoural oedema), 4 ET (enhancing tumour)

and the evaluation regions of :func:`brats_regions`: WT (whole tumour) = {1, 2, 4}, TC (tumour core) = {1, 4},
ET = {4}; ET within TC within WT by construction.

Shapes are irregular: a sphere's radius is modulated by a smooth random field (``|p - c| (1 + a n(p)) < R``), one
field per compartment; the compartments are then nested explicitly (NCR within TC, TC within WT) and clipped to the
brain. Oedema only spreads through parenchyma (never into CSF). The tumour's mass effect is a radial push velocity
(:func:`meddiff3d.data.synthetic.deformation.radial_push_velocity`) returned with the centre and radius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meddiff3d.data.brats import BRATS_LABELS, LABEL_NAMES, region_masks

from .grid import Grid, smooth_noise

BRATS2021_LABELS = LABEL_NAMES["brats2021"]
NCR, ED, ET = (BRATS_LABELS["brats2021"][k] for k in ("NCR", "ED", "ET"))


def brats_regions(label: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean evaluation regions of a BraTS 2021 label map: ``{"WT": {1,2,4}, "TC": {1,4}, "ET": {4}}``."""
    return region_masks(np.asarray(label), "brats2021")


@dataclass
class TumourPlan:
    """Where a tumour goes, drawn before the anatomy is warped (the mass effect is part of the warp)."""

    centre_mm: np.ndarray
    core_radius_mm: float
    necrosis_ratio: float  # NCR radius / core radius
    oedema_ratio: float  # oedema radius / core radius
    push_mm: float  # peak displacement of the mass effect


def plan_tumour(rng: np.random.Generator, depth_mm: np.ndarray, grid: Grid,
                radius_mm: tuple[float, float] = (10.0, 22.0)) -> TumourPlan:
    """Draw a tumour centre deep enough inside the parenchyma (rejection sampling in world mm) and its sizes."""
    radius = float(rng.uniform(*radius_mm))
    low, high = np.asarray(grid.low_mm), np.asarray(grid.low_mm) + np.asarray(grid.fov_mm)
    centre, best, best_depth = None, None, -1.0
    for _ in range(2000):
        point = rng.uniform(low, high)
        index = np.clip(np.round(grid.world_to_voxel(point)).astype(int), 0, np.asarray(grid.shape) - 1)
        depth = float(depth_mm[tuple(index)])
        if depth >= min(0.6 * radius, 15.0):
            centre = point
            break
        if depth > best_depth:
            best, best_depth = point, depth
    centre = best if centre is None else centre
    return TumourPlan(
        centre_mm=np.asarray(centre, dtype=np.float64),
        core_radius_mm=radius,
        necrosis_ratio=float(rng.uniform(0.3, 0.65)),
        oedema_ratio=float(rng.uniform(1.25, 1.7)),
        push_mm=float(rng.uniform(0.25, 0.45) * radius),
    )


def _blob(grid: Grid, centre_mm, radius_mm: float, noise: np.ndarray, roughness: float) -> np.ndarray:
    x, y, z = np.meshgrid(*grid.axes(), indexing="ij", sparse=True)
    c = np.asarray(centre_mm, dtype=np.float32)
    distance = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    return distance * (1.0 + roughness * noise) < radius_mm


def tumour_label(rng: np.random.Generator, plan: TumourPlan, grid: Grid, brain: np.ndarray,
                 parenchyma: np.ndarray) -> np.ndarray:
    """The BraTS 2021 label map (uint8: 0, 1, 2, 4) of a planned tumour on the (already warped) subject anatomy.

    ``brain`` and ``parenchyma`` are the subject's intracranial and GM+WM fractions; the tumour stays where
    ``brain > 0.5``, the oedema where ``parenchyma > 0.3``. The core always keeps at least its centre voxel.
    """
    correlation = max(0.8 * plan.core_radius_mm, 6.0)
    noise = smooth_noise(rng, grid, correlation, channels=3)
    inside = brain > 0.5
    core = _blob(grid, plan.centre_mm, plan.core_radius_mm, noise[0], 0.3) & inside
    centre_index = tuple(np.clip(np.round(grid.world_to_voxel(plan.centre_mm)).astype(int), 0, np.asarray(grid.shape) - 1))
    core[centre_index] = True
    necrosis = _blob(grid, plan.centre_mm, plan.necrosis_ratio * plan.core_radius_mm, noise[1], 0.3) & core
    oedema = _blob(grid, plan.centre_mm, plan.oedema_ratio * plan.core_radius_mm, noise[2], 0.4)
    oedema &= inside & (parenchyma > 0.3)
    label = np.zeros(grid.shape, dtype=np.uint8)
    label[oedema | core] = ED
    label[core] = ET
    label[necrosis] = NCR
    return label


def focal_lesions(rng: np.random.Generator, grid: Grid, allowed: np.ndarray, count: int,
                  radius_mm: tuple[float, float]) -> np.ndarray:
    """A boolean mask of ``count`` irregular blobs centred in ``allowed`` (a boolean mask), clipped to ``allowed``.

    Radii are at least one voxel so every lesion is visible at coarse test resolutions.
    """
    mask = np.zeros(grid.shape, dtype=bool)
    candidates = np.argwhere(allowed)
    if len(candidates) == 0:
        return mask
    noise = smooth_noise(rng, grid, 6.0)[0]
    min_radius = float(grid.spacing.max())
    for _ in range(count):
        index = candidates[rng.integers(len(candidates))]
        centre = np.asarray(grid.low_mm) + (index + 0.5) * grid.spacing
        radius = max(float(rng.uniform(*radius_mm)), min_radius)
        mask |= _blob(grid, centre, radius, noise, 0.25)
        mask[tuple(index)] = True
    return mask & allowed
