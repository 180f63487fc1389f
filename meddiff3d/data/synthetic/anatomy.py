"""Template anatomy: tissue probability maps on the output grid, from MNI152 (nilearn) or a procedural brain.

Both sources give the same :class:`Anatomy`: a ``(7, *shape)`` float32 stack of partial-volume maps in [0, 1] named
by :data:`TISSUES`:

* ``gm``, ``wm``, ``csf`` -- grey matter, white matter, cerebrospinal fluid; inside the brain ``gm + wm + csf ~ brain``;
* ``ventricles`` -- the lateral ventricles, a subset of ``csf`` (``ventricles <= csf``);
* ``brain`` -- the intracranial mask (parenchyma + CSF);
* ``skull``, ``scalp`` -- shells outside the brain (1-5 mm and 5-9 mm from it), used only for images with skull.

plus what the subject generators need, derived once per template: ``depth_mm`` (distance from the parenchyma surface
into the parenchyma, 0 at and outside the surface; cortical thinning eats GM with depth < thickness loss) and
``ventricle_field`` (a unit-peak velocity on the control lattice pointing into the ventricles; age scales it).

The template stands for a 40-year-old: age effects are added on top of it by :mod:`.subjects`.
Sources: ``"mni"`` = MNI152 (ICBM152 2009a, asymmetric) T1/GM/WM shipped with nilearn (loaded offline; CSF = intracranial mask
minus GM and WM; ventricles = dark CSF components in the lateral-ventricle region); ``"procedural"`` = nested
ellipsoids with a noise-folded cortical ribbon, deep grey nuclei and two curved lateral ventricles (no nilearn, fast).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from meddiff3d.errors import InputError

from .deformation import attraction_field, control_lattice
from .grid import Grid, resample, smooth_noise

TISSUES = ("gm", "wm", "csf", "ventricles", "brain", "skull", "scalp")
SOURCES = ("mni", "procedural")
# MNI152 1 mm grid as shipped by nilearn: 197 x 233 x 189, voxel centre (0, 0, 0) at (-98, -134, -72) mm.
MNI_GRID = Grid(shape=(197, 233, 189), fov_mm=(197.0, 233.0, 189.0), low_mm=(-98.5, -134.5, -72.5))
VENTRICLE_SIGMA_MM = 8.0
PROCEDURAL_SEED = 20240611


@dataclass
class Anatomy:
    """Tissue maps of one template on one grid, plus fields derived from them (see module docstring)."""

    source: str
    grid: Grid
    maps: np.ndarray  # (len(TISSUES), *grid.shape) float32
    depth_mm: np.ndarray  # (*grid.shape) float32
    ventricle_field: np.ndarray  # (3, *control_lattice(grid).shape) float32

    def __getitem__(self, name: str) -> np.ndarray:
        return self.maps[TISSUES.index(name)]


def _ramp(signed_mm: np.ndarray, width_mm: float) -> np.ndarray:
    """Partial-volume fraction of a voxel whose centre is ``signed_mm`` inside a surface (linear over one voxel)."""
    return np.clip(signed_mm / width_mm + 0.5, 0.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _mni_source_maps() -> np.ndarray:
    """GM, WM, CSF, ventricles, brain on the MNI 1 mm grid (cached per process; about 3 s)."""
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise InputError("synthetic source 'mni' needs nilearn (pip install nilearn), or use --source procedural") from err
    t1 = np.asarray(datasets.load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(), dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(), dtype=np.float32)
    if t1.shape != MNI_GRID.shape:
        raise InputError(f"nilearn MNI152 template has shape {t1.shape}, expected {MNI_GRID.shape}")
    parenchyma = gm + wm
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(parenchyma > 0.3, iterations=3)).astype(np.float32)
    brain = np.maximum(brain, np.clip(parenchyma, 0, 1))
    csf = np.clip(brain - parenchyma, 0.0, 1.0)
    # lateral ventricles: dark CSF in a box around them, the large off-midline components (left and right)
    x, y, z = np.meshgrid(*MNI_GRID.axes(), indexing="ij", sparse=True)
    box = (np.abs(x) < 35) & (y > -60) & (y < 40) & (z > -10) & (z < 40)
    dark_csf = (csf > 0.3) & box & (t1 < 0.4)
    labels, count = ndimage.label(dark_csf)
    keep = np.zeros(count + 1, dtype=bool)
    for index, (size, centre) in enumerate(
        zip(ndimage.sum(dark_csf, labels, range(1, count + 1)), ndimage.center_of_mass(dark_csf, labels, range(1, count + 1))),
        start=1,
    ):
        keep[index] = size > 1000 and abs(centre[0] - 98) > 5
    ventricle_mask = ndimage.binary_dilation(keep[labels], iterations=1)
    ventricles = csf * ventricle_mask
    return np.stack([gm, wm, csf, ventricles, brain]).astype(np.float32)


def _procedural_maps(grid: Grid) -> np.ndarray:
    """GM, WM, CSF, ventricles, brain of a fixed procedural brain, computed directly on ``grid``."""
    rng = np.random.default_rng(PROCEDURAL_SEED)
    s = float(grid.spacing.mean())
    x, y, z = (a.astype(np.float32) for a in np.meshgrid(*grid.axes(), indexing="ij", sparse=True))
    low, fold, fold2 = smooth_noise(rng, grid, 40.0)[0], smooth_noise(rng, grid, 10.0)[0], smooth_noise(rng, grid, 8.0)[0]
    # brain hull: ellipsoid like the MNI brain, radius modulated by low-frequency noise; d = depth below it in mm
    semi, centre = (67.0, 88.0, 72.0), (0.0, -16.5, 5.5)
    rho = np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2)
    depth = (1.0 - rho * (1.0 + 0.03 * low)) * 75.0
    brain = _ramp(depth, s)
    csf_depth = 1.0 + 10.0 * np.clip(fold - 0.6, 0.0, None)  # sulci where the folding noise is high
    csf = brain * _ramp(csf_depth - depth, s)
    wm = brain * _ramp(depth - (csf_depth + np.clip(6.0 + 3.0 * fold2, 2.5, None)), s)
    gm = np.clip(brain - wm - csf, 0.0, 1.0)
    # deep grey nuclei (thalamus / basal ganglia) replace white matter
    for side in (-1.0, 1.0):
        r = np.sqrt(((x - side * 22.0) / 10.0) ** 2 + ((y + 8.0) / 16.0) ** 2 + ((z - 2.0) / 10.0) ** 2)
        nucleus = _ramp((1.0 - r) * 10.0, s)
        gm, wm = gm + wm * nucleus, wm * (1.0 - nucleus)
    # two lateral ventricles, curved down at both ends
    ventricles = np.zeros(grid.shape, dtype=np.float32)
    for side in (-1.0, 1.0):
        zc = 14.0 - 0.012 * (y + 14.0) ** 2
        r = np.sqrt(((x - side * 12.0) / 6.0) ** 2 + ((y + 14.0) / 26.0) ** 2 + ((z - zc) / 9.0) ** 2)
        ventricles = np.maximum(ventricles, _ramp((1.0 - r) * 7.0, s))
    ventricles *= brain
    gm, wm = gm * (1.0 - ventricles), wm * (1.0 - ventricles)
    csf = csf * (1.0 - ventricles) + ventricles
    return np.stack([gm, wm, csf, ventricles, brain]).astype(np.float32)


def _shells(brain: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Skull (1-5 mm outside the brain) and scalp (5-9 mm) as partial-volume shells."""
    s = float(grid.spacing.mean())
    outside = ndimage.distance_transform_edt(brain < 0.5, sampling=grid.spacing).astype(np.float32)
    skull = _ramp(outside - 1.0, s) * _ramp(5.0 - outside, s)
    scalp = _ramp(outside - 5.0, s) * _ramp(9.0 - outside, s)
    return skull, scalp


@functools.lru_cache(maxsize=4)
def load_anatomy(source: str = "procedural", shape: tuple[int, int, int] = (160, 224, 160)) -> Anatomy:
    """The template :class:`Anatomy` of ``source`` (``"mni"`` or ``"procedural"``) on the standard grid of ``shape``.

    Cached per process (the returned arrays are shared: do not modify them in place).
    """
    from .grid import grid_for_shape

    if source not in SOURCES:
        raise InputError(f"synthetic anatomy source {source!r} is unknown; choose one of {list(SOURCES)}")
    grid = grid_for_shape(shape)
    if source == "mni":
        maps = resample(_mni_source_maps(), MNI_GRID, grid)
    else:
        maps = _procedural_maps(grid)
    maps = np.clip(maps, 0.0, 1.0)
    skull, scalp = _shells(maps[4], grid)
    maps = np.concatenate([maps, skull[None], scalp[None]]).astype(np.float32)
    parenchyma = (maps[0] + maps[1]) >= 0.5
    edt = ndimage.distance_transform_edt(parenchyma, sampling=grid.spacing).astype(np.float32)
    depth = np.clip(edt - float(grid.spacing.min()), 0.0, None)
    lattice = control_lattice(grid)
    ventricles_on_lattice = resample(maps[3], grid, lattice)
    field = attraction_field(ventricles_on_lattice, lattice, VENTRICLE_SIGMA_MM)
    return Anatomy(source=source, grid=grid, maps=maps, depth_mm=depth, ventricle_field=field)
