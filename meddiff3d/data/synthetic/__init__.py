"""Synthetic cohorts with known answers: healthy brains with covariates, BraTS-like tumours, anomaly sets.

Deterministic by seed (subject ``k`` depends only on ``(seed, k)``), written as RAS NIfTI over a fixed
160 x 224 x 160 mm MNI-centred field of view plus a meddiff3d datalist. Modules: :mod:`.grid` (geometry, sampling),
:mod:`.anatomy` (template tissue maps), :mod:`.deformation` (diffeomorphic warps), :mod:`.contrast` (MR contrasts),
:mod:`.lesions` (tumours, focal lesions, BraTS regions), :mod:`.subjects` (one subject), :mod:`.cohorts` (datasets),
:mod:`.cli` (``meddiff3d synth``).
"""

from .anatomy import TISSUES, Anatomy, load_anatomy
from .cohorts import COVARIATE_SCALING, KINDS, CohortSummary, split_of, write_cohort
from .contrast import SEQUENCES, TISSUE_INTENSITY
from .grid import DEFAULT_SHAPE, FOV_LOW_MM, FOV_MM, Grid, grid_for_shape
from .lesions import BRATS2021_LABELS, brats_regions
from .subjects import LESION_KINDS, Subject, anomaly_subject, brats_subject, healthy_subject

__all__ = [
    "Anatomy", "BRATS2021_LABELS", "COVARIATE_SCALING", "CohortSummary", "DEFAULT_SHAPE", "FOV_LOW_MM", "FOV_MM",
    "Grid", "KINDS", "LESION_KINDS", "SEQUENCES", "Subject", "TISSUES", "TISSUE_INTENSITY", "anomaly_subject",
    "brats_regions", "brats_subject", "grid_for_shape", "healthy_subject", "load_anatomy", "split_of",
    "write_cohort",
]
