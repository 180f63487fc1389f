"""BraTS label conventions and evaluation regions, in one place.

Label maps (``label_convention`` in a datalist)::

    brats2021:  0 background, 1 NCR (necrotic core), 2 ED (oedema / SNFH), 4 ET (enhancing tumour)
    brats2023:  0 background, 1 NCR,                 2 ED,                 3 ET

Evaluation regions, in this channel order: WT (whole tumour) = NCR + ED + ET, TC (tumour core) = NCR + ET,
ET = ET; so ET lies within TC within WT. MONAI's ``ConvertToMultiChannelBasedOnBratsClasses`` uses the order
TC, WT, ET and knows only the 2021 labels.
"""

from __future__ import annotations

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
