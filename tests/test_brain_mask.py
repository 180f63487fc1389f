"""meddiff3d.data.brain_mask: the offline brain mask on synthetic heads with known intracranial masks, the
skull-stripped input contract, `datalist t1 --skull-strip`."""

import json

import nibabel as nib
import numpy as np
import pytest

from meddiff3d.data.brain_mask import MAX_OUTSIDE_ML, brain_mask, check_skull_stripped, tissue_outside_brain_ml
from meddiff3d.data.synthetic import TISSUES, anomaly_subject, healthy_subject, load_anatomy
from meddiff3d.errors import InputError
from meddiff3d.utils.io import save_nifti

pytestmark = pytest.mark.usefixtures("one_thread")


def dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def mni2mm():
    return load_anatomy("mni", (80, 112, 80))


@pytest.mark.parametrize("variant", ["standard", "contrast"])
def test_brain_mask_of_a_synthetic_head_matches_its_intracranial_mask(mni2mm, variant):
    """Dice > 0.9 against the known brain mask, with the template contrast and with the out-of-template one
    (measured 0.967 and 0.943 at 2 mm; 0.966 at 1 mm)."""
    subject = healthy_subject(mni2mm, 0, 2, skull_strip=False, variant=variant)
    mask = brain_mask(subject.images["t1"], mni2mm.grid.affine)
    assert mask.dtype == np.uint8 and mask.shape == subject.images["t1"].shape
    assert dice(mask > 0, subject.maps[TISSUES.index("brain")] > 0.5) > 0.9


def test_the_contract_check_fires_on_an_unstripped_head_only():
    """Skull-stripped volumes (every lesion kind, procedural and MNI152, 5 mm to 2.5 mm) keep below the bound
    (measured <= 40 mL), heads with skull and scalp are far above it (>= 220 mL)."""
    for source, shape in (("procedural", (32, 48, 32)), ("mni", (64, 96, 64))):
        anatomy = load_anatomy(source, shape)
        affine = anatomy.grid.affine
        for index, kind in enumerate(("none", "tumour", "multifocal", "dark")):
            image = anomaly_subject(anatomy, 0, index, kind).images["t1"]
            assert tissue_outside_brain_ml(image, affine) < MAX_OUTSIDE_ML / 2, (source, kind)
            check_skull_stripped(image, affine, "stripped.nii.gz")
        head = healthy_subject(anatomy, 0, 0, skull_strip=False).images["t1"]
        assert tissue_outside_brain_ml(head, affine) > 1.4 * MAX_OUTSIDE_ML, source
        with pytest.raises(InputError, match=r"head\.nii\.gz: \d+ mL of tissue outside the brain.*skull-stripped"):
            check_skull_stripped(head, affine, "head.nii.gz")


def test_datalist_t1_skull_strip_writes_the_masked_image_and_its_mask(mni2mm, tmp_path, capsys):
    from meddiff3d.cli import main

    subject = healthy_subject(mni2mm, 0, 1, skull_strip=False)
    src = tmp_path / "heads"
    save_nifti(subject.images["t1"], mni2mm.grid.affine, src / "head01.nii.gz")
    code = main(["datalist", "t1", str(src), "--out", str(tmp_path / "out"), "--skull-strip", "--spacing", "2", "2",
                 "2", "--shape", "80", "112", "80", "--fractions", "1", "0", "0"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads((tmp_path / "out" / "datalist.json").read_text())
    (item,) = doc["training"]
    assert doc["skull_stripped"] is True and item["brain_mask"].endswith("masks/head01_brain.nii.gz")
    image = np.asarray(nib.load(tmp_path / "out" / item["image"]).dataobj)
    mask = np.asarray(nib.load(tmp_path / "out" / item["brain_mask"]).dataobj)
    assert set(np.unique(mask)) == {0, 1} and np.all(image[mask == 0] == 0) and image[mask == 1].mean() > 0
    check_skull_stripped(image, nib.load(tmp_path / "out" / item["image"]).affine, "converted")
