"""MONAI dictionary-transform pipelines, one factory per task, and the way back to the input grid.

Every factory takes datalist items (see :mod:`meddiff3d.data.datalist`) and returns a :class:`monai.transforms.Compose`:

1. :class:`LoadVolumed` - reader chosen per file: ``NibabelReader`` for NIfTI, ``ITKReader`` (LPS converted to RAS)
   for NRRD/MetaImage and DICOM series folders; MONAI's ``EnsureChannelFirst`` per file; a list of files becomes
   channels (one per modality, in order; ``x, y, z`` and ``x, y, z, 1`` files may mix);
2. ``Orientationd("RAS")`` -> ``Spacingd`` (bilinear for images, nearest for labels);
3. intensity normalisation per task (below), before padding so padded voxels are background (0);
4. ``ResizeWithPadOrCropd`` to the target ``shape`` (centre crop / symmetric zero pad), then an optional random
   ``patch_size`` crop for training;
5. task extras: BraTS labels -> WT/TC/ET channels (:class:`BratsRegionsd`), covariates -> a float vector
   (:class:`CovariatesToTensord`).

Intensity normalisation:

=====================  ===========================================================================================
T1 generation          percentile scaling: the 0th..99.5th percentile of each volume -> [0, 1] (as the MONAI
                       model-zoo brain latent diffusion bundles); voxels above the 99.5th percentile stay > 1
                       unless ``clip=True``
BraTS (4 channels)     z-score per channel over the non-zero (brain) voxels; background stays 0
anomaly detection      the same as T1 generation (``normalisation="percentile"``) or ``"zscore"`` as BraTS
=====================  ===========================================================================================

Geometric transforms are MONAI invertible transforms recorded on the image's MetaTensor (``applied_operations``), so a
network output on the training grid goes back to the file's grid with :func:`to_input_grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.data import ITKReader, MetaTensor, NibabelReader, decollate_batch
from monai.transforms import (
    Compose,
    EnsureTyped,
    Invertd,
    LoadImage,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    SpatialResample,
    Spacingd,
)

from meddiff3d.data.brats import BRATS_LABELS, BRATS_REGIONS, region_masks  # noqa: F401 (re-exported)
from meddiff3d.errors import InputError



# ------------------------------------------------------------------------------------------------------- components
def reader_for(files: str | Sequence[str]):
    """The MONAI reader for ``files``: ``NibabelReader`` if all are NIfTI, else ``ITKReader`` (RAS affine)."""
    names = [str(f).lower() for f in ([files] if isinstance(files, (str, Path)) else files)]
    if all(n.endswith((".nii", ".nii.gz")) for n in names):
        return NibabelReader()
    return ITKReader(affine_lps_to_ras=True)


class LoadVolumed(MapTransform):
    """``LoadImaged`` with the reader chosen per file by :func:`reader_for` (DICOM series folders go to ITK).

    MONAI's automatic choice would also pick nibabel for NIfTI and ITK for the rest today, but it depends on which
    optional packages are installed (pynrrd, pydicom); choosing here keeps the RAS affine handling fixed.
    """

    def __init__(self, keys, allow_missing_keys: bool = True, dtype=np.float32):
        super().__init__(keys, allow_missing_keys)
        self._load = LoadImage(image_only=True, dtype=dtype, ensure_channel_first=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.load(d[key])
        return d

    def load(self, files: str | Sequence[str]) -> MetaTensor:
        """One channel-first MetaTensor; files of a list are loaded one by one (``x, y, z`` and ``x, y, z, 1`` may
        mix) and concatenated as channels with the metadata of the first."""
        many = not isinstance(files, (str, Path))
        volumes = []
        for file in (files if many else [files]):
            try:
                volumes.append(self._load(file, reader=reader_for(file)))
            except Exception as err:
                raise InputError(f"{file}: could not load ({type(err).__name__}: {err})") from err
        shapes = {tuple(v.shape[1:]) for v in volumes}
        if len(shapes) > 1:
            raise InputError(f"{list(files)}: modalities have different shapes {sorted(shapes)}")
        if len(volumes) == 1:
            return volumes[0]
        out = MetaTensor(torch.cat([v.as_tensor() for v in volumes]), meta=dict(volumes[0].meta))
        out.meta["filename_or_obj"] = [str(f) for f in files]
        return out


class BratsRegionsd(MapTransform):
    """BraTS label map -> 3 binary channels in :data:`BRATS_REGIONS` order (WT, TC, ET).

    WT = NCR + ED + ET, TC = NCR + ET, ET = ET, where ET is label 4 (``brats2021``) or 3 (``brats2023``).
    ``convention="auto"`` uses the item's ``convention`` (``load_datalist`` copies the datalist's ``label_convention``
    there) if present, else accepts either (a volume holding both
    3 and 4 is an error). Any label value outside the convention is an error naming the file.
    """

    def __init__(self, keys, convention: str = "auto", allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)
        if convention not in ("auto", *BRATS_LABELS):
            raise ValueError(f"convention must be 'auto' or one of {list(BRATS_LABELS)}, got {convention!r}")
        self.convention = convention

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        convention = self.convention
        if convention == "auto":
            convention = d.get("convention", "auto")
        for key in self.key_iterator(d):
            d[key] = brats_regions(d[key], convention, name=_name_of(d[key]))
        return d


def brats_regions(label, convention: str = "auto", name: str = "label"):
    """WT/TC/ET channels (``(3, *spatial)``, same type as ``label``) of a BraTS label map ``(1, *spatial)``."""
    values = {int(v) if float(v).is_integer() else v for v in torch.unique(torch.as_tensor(label)).tolist()} - {0}
    if convention == "auto":
        if {3, 4} <= values:
            raise InputError(f"{name}: holds both labels 3 and 4; set label_convention (brats2021 or brats2023)")
        et = 3 if 3 in values else 4
    else:
        if convention not in BRATS_LABELS:
            raise InputError(f"{name}: unknown label_convention {convention!r}; expected one of {list(BRATS_LABELS)}")
        et = BRATS_LABELS[convention]["ET"]
    convention = "brats2021" if et == 4 else "brats2023"
    unexpected = sorted(values - {1, 2, et})
    if unexpected:
        raise InputError(
            f"{name}: label values {unexpected} are not part of the {convention} convention (1, 2, {et})"
        )
    lab = torch.as_tensor(label[0] if label.shape[0] == 1 else label)
    masks = region_masks(lab, convention)
    out = torch.stack([masks[name] for name in BRATS_REGIONS]).float()
    if isinstance(label, MetaTensor):
        out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
    return out


class CovariatesToTensord(MapTransform):
    """Item covariates ``{"age": 0.4, "sex": 1.0}`` -> a float32 vector under ``out_key``, in the order of ``names``.

    The order is the order of ``names`` given here (the bundle config fixes it); a missing name is an error.
    """

    def __init__(self, names: Sequence[str], key: str = "covariates", out_key: str = "covariates"):
        super().__init__([key], allow_missing_keys=False)
        self.names = tuple(names)
        self.key, self.out_key = key, out_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        values = d.get(self.key) or {}
        missing = [n for n in self.names if n not in values]
        if missing:
            raise InputError(f"item {d.get('id', '?')}: covariates {missing} missing (have {sorted(values)})")
        d[self.out_key] = torch.tensor([float(values[n]) for n in self.names], dtype=torch.float32)
        return d


def _name_of(x) -> str:
    if isinstance(x, MetaTensor):
        return str(x.meta.get("filename_or_obj", "label"))
    return "label"


def _geometry(image_key: str, label_keys: Sequence[str], spacing, label_mode: str = "nearest") -> list:
    keys = [image_key, *label_keys]
    return [
        LoadVolumed(keys),  # channel first (MONAI EnsureChannelFirst per file)
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True),
        Spacingd(keys, pixdim=tuple(spacing), mode=["bilinear"] + [label_mode] * len(label_keys),
                 allow_missing_keys=True),
    ]


def _shape_and_patch(keys: Sequence[str], shape, train: bool, patch_size) -> list:
    out = [ResizeWithPadOrCropd(keys, spatial_size=tuple(shape), mode="constant", allow_missing_keys=True)]
    if train and patch_size is not None:
        out.append(RandSpatialCropd(keys, roi_size=tuple(patch_size), random_size=False, allow_missing_keys=True))
    return out


def _percentile(key: str, clip: bool):
    return ScaleIntensityRangePercentilesd(key, lower=0, upper=99.5, b_min=0.0, b_max=1.0, clip=clip)


def _zscore(key: str):
    return NormalizeIntensityd(key, nonzero=True, channel_wise=True)


# -------------------------------------------------------------------------------------------------------- factories
def t1_brain_transforms(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (160, 224, 160),
    train: bool = True,
    *,
    patch_size: Sequence[int] | None = None,
    covariates: Sequence[str] | None = None,
    clip: bool = False,
) -> Compose:
    """T1 brain generation: ``image`` -> RAS, ``spacing``, percentile-scaled to [0, 1], padded/cropped to ``shape``.

    ``covariates`` (names, in order) adds a float vector ``covariates``; ``patch_size`` adds a random crop when
    ``train``.
    """
    keys = ["image"]
    steps = [*_geometry("image", [], spacing), _percentile("image", clip), *_shape_and_patch(keys, shape, train,
                                                                                           patch_size)]
    if covariates:
        steps.append(CovariatesToTensord(covariates))
    steps.append(EnsureTyped("image", dtype=torch.float32))
    return Compose(steps)


def brats_transforms(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (240, 240, 160),
    train: bool = True,
    patch_size: Sequence[int] | None = None,
    *,
    label_convention: str = "auto",
    regions: bool = True,
) -> Compose:
    """BraTS: 4-channel ``image`` (t1, t1ce, t2, flair) z-scored per channel over brain voxels; ``label`` (optional)
    -> WT/TC/ET channels (``regions=True``) or kept as a label map; both on one RAS grid of ``shape``.
    """
    keys = ["image", "label"]
    steps = [*_geometry("image", ["label"], spacing), _zscore("image")]
    if regions:
        steps.append(BratsRegionsd("label", convention=label_convention))
    steps += _shape_and_patch(keys, shape, train, patch_size)
    steps.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return Compose(steps)


def anomaly_transforms(
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    shape: Sequence[int] = (160, 224, 160),
    train: bool = True,
    *,
    patch_size: Sequence[int] | None = None,
    normalisation: str = "percentile",
    clip: bool = False,
) -> Compose:
    """Anomaly detection: ``image`` (one or more modalities) normalised as T1 generation (``"percentile"``) or BraTS
    (``"zscore"``); an optional ``label`` (ground-truth anomaly mask) follows with nearest interpolation.
    """
    if normalisation not in ("percentile", "zscore"):
        raise ValueError(f"normalisation must be 'percentile' or 'zscore', got {normalisation!r}")
    keys = ["image", "label"]
    norm = _percentile("image", clip) if normalisation == "percentile" else _zscore("image")
    steps = [*_geometry("image", ["label"], spacing), norm, *_shape_and_patch(keys, shape, train, patch_size)]
    steps.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return Compose(steps)


# ---------------------------------------------------------------------------------------------- back to input grid
def to_input_grid(output, data: Mapping, transform: Compose | None = None, *, key: str = "image",
                  mode: str = "bilinear"):
    """Map a network-grid ``output`` back onto the grid of the file ``data[key]`` was loaded from.

    Args:
        output: a tensor ``(C, *spatial)`` on the grid of ``data[key]`` (after the transforms), a dict of such
            tensors, or a batch ``(B, C, *spatial)`` with ``data`` a collated batch (returns a list then).
        data: the transformed item whose ``data[key]`` MetaTensor carries the applied operations and metadata.
        transform: the Compose that produced ``data``; if given, MONAI's :class:`~monai.transforms.Invertd` undoes
            its invertible (geometric) steps in reverse order; if ``None``, the output is resampled directly from its
            grid (``data[key].affine``) onto the original one (``original_affine``, ``spatial_shape`` from the reader).
            Both give the same grid; the first reproduces the exact inverse of crops and pads.
        mode: interpolation, ``"bilinear"`` for images / probabilities, ``"nearest"`` for label maps.

    Returns a MetaTensor ``(C, *input_spatial)`` whose ``affine`` is the input file's RAS affine (ready for SaveImage).
    """
    if isinstance(output, Mapping):
        return {name: to_input_grid(value, data, transform, key=key, mode=mode) for name, value in output.items()}
    ref = data[key]
    if not isinstance(ref, MetaTensor):
        raise TypeError(f"data[{key!r}] must be the MetaTensor produced by the transforms, got {type(ref).__name__}")
    output = torch.as_tensor(output)
    if getattr(ref, "is_batch", False):
        return [to_input_grid(o, d, transform, key=key, mode=mode)
                for o, d in zip(decollate_batch(output), decollate_batch(data))]
    if transform is not None:
        pred_key = f"_{key}_output"
        item = {key: ref, pred_key: MetaTensor(output, meta=dict(ref.meta))}
        inverted = Invertd(pred_key, transform=transform, orig_keys=key, nearest_interp=(mode == "nearest"),
                           to_tensor=True)(item)
        return inverted[pred_key]
    src = MetaTensor(output, affine=ref.affine, meta={k: v for k, v in ref.meta.items() if k != "affine"})
    dst_affine = torch.as_tensor(np.asarray(ref.meta["original_affine"], dtype=np.float64))
    spatial = [int(s) for s in np.asarray(ref.meta["spatial_shape"]).ravel()]
    out = SpatialResample(mode=mode, padding_mode="zeros", dtype=torch.float64)(src, dst_affine=dst_affine,
                                                                                  spatial_size=spatial)
    out = out.to(output.dtype)
    out.applied_operations = []
    return out
