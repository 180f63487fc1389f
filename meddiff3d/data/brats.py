"""BraTS label conventions and evaluation regions, in one place.

Label maps (``label_convention`` in a datalist)::

    brats2021:  0 background, 1 NCR (necrotic core), 2 ED (oedema / SNFH), 4 ET (enhancing tumour)
    brats2023:  0 background, 1 NCR,                 2 ED,                 3 ET

Evaluation regions, in this channel order: WT (whole tumour) = NCR + ED + ET, TC (tumour core) = NCR + ET,
ET = ET; so ET lies within TC within WT. MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` uses the order
TC, WT, ET and knows only the 2021 labels.
"""

from __future__ import annotations

#: the four MR sequences, in channel order (the datalist ``modalities`` of BraTS cases; 2023 names map onto them)
BRATS_MODALITIES = ("t1", "t1ce", "t2", "flair")
#: channel order of region masks: whole tumour, tumour core, enhancing tumour
BRATS_REGIONS = ("WT", "TC", "ET")
#: label values per convention
BRATS_LABELS = {
    "brats2021": {"NCR": 1, "ED": 2, "ET": 4},
    "brats2023": {"NCR": 1, "ED": 2, "ET": 3},
}
#: the datalist ``labels`` block of each convention (value -> name)
LABEL_NAMES = {
    name: {"0": "background", **{str(v): k for k, v in labels.items()}} for name, labels in BRATS_LABELS.items()
}


def region_masks(label, convention: str = "brats2021") -> dict:
    """``{"WT", "TC", "ET"}`` boolean masks of a label map (numpy array or torch tensor, any shape)."""
    values = BRATS_LABELS[convention]
    ncr, ed, et = values["NCR"], values["ED"], values["ET"]
    wt = (label == ncr) | (label == ed) | (label == et)
    tc = (label == ncr) | (label == et)
    return {"WT": wt, "TC": tc, "ET": label == et}


def regions_to_labels(regions, convention: str = "brats2021", threshold: float = 0.5):
    """A BraTS label map from WT/TC/ET channels (numpy or torch, ``(3, *spatial)``, binary or probabilities).

    Nested decoding: a voxel is tumour if ``WT > threshold``; within WT it is core if ``TC > threshold``; within the
    core it is enhancing if ``ET > threshold``. So ``ED = WT - TC``, ``NCR = TC - ET``, ``ET = ET`` (TC outside WT
    and ET outside TC are dropped). Returns ``uint8`` (numpy) / ``torch.uint8`` labels of shape ``spatial``.
    """
    values = BRATS_LABELS[convention]
    if regions.shape[0] != len(BRATS_REGIONS):
        raise ValueError(f"expected {len(BRATS_REGIONS)} region channels {BRATS_REGIONS}, got shape "
                         f"{tuple(regions.shape)}")
    wt = regions[0] > threshold
    tc = wt & (regions[1] > threshold)
    et = tc & (regions[2] > threshold)
    labels = wt * values["ED"] + tc * (values["NCR"] - values["ED"]) + et * (values["ET"] - values["NCR"])
    if hasattr(labels, "astype"):  # numpy
        return labels.astype("uint8")
    import torch

    return labels.to(torch.uint8)
