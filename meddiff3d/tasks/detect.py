"""``meddiff3d detect``: anomaly detection in T1 volumes by the anomaly bundle's own inference (``configs/inference.yaml``).

    meddiff3d detect [--bundle B] -i T1_FILE | FOLDER_OF_T1 | DATALIST.json [--section S] [--calibration C] [-o OUT]

``-i`` is a T1 file (NIfTI, NRRD, MetaImage), a folder of them (each file a case, id = its name without suffix;
DICOM series sub-folders too, id = the sub-folder's name), one DICOM series folder (its slice files directly in it:
one case, id = the folder's name; a folder mixing series, or slices and image files, is refused), or a datalist JSON
(every section that has items, or ``--section``). Writes per case ``OUT/<id>_healed.nii.gz``,
``_anomaly_map.nii.gz`` (z-scores), ``_mask.nii.gz`` (uint8) on the input's grid and affine, ``_preview.png``, and
``OUT/summary.json`` (volume scores, which cases are anomalous). Detector settings and thresholds come from the
calibration file only (``meddiff3d calibrate`` makes one).

flag                  bundle config key   meaning
--bundle B            bundle_root         bundle folder (default: the shipped brain_mri_anomaly_ldm)
-i, --input IN        inputs              T1 file(s) (a folder: every image file or series sub-folder in it;
                                          a DICOM series folder: that one volume), or a datalist JSON
--section S           section             training | validation | test (a datalist -i only; default: the
                                          config's, every section that has items)
--calibration C       calibration_path    calibration JSON (default: the bundle's; meddiff3d calibrate -o)
-o, --output OUT      output_dir          default ./outputs/anomaly under the current folder
--device D            device              auto | cpu | cuda | cuda:N
--amp A               amp                 auto | bf16 | fp16 | none
Unset flags keep the bundle config's values (python -m monai.bundle run --key value runs the same).
"""

from __future__ import annotations

import argparse

from meddiff3d.tasks.bundle import (absolute, add_bundle_arguments, common_overrides, default_output, find_bundle,
                                    input_path, no_section_for, run_bundle, setup_logging, t1_inputs)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="IN",
                        help="T1 file, folder of T1 files, DICOM series folder, or datalist JSON")
    parser.add_argument("--section", choices=("training", "validation", "test"),
                        help="datalist section (default: every section that has items)")
    parser.add_argument("--calibration", metavar="C", help="calibration JSON (made by meddiff3d calibrate)")
    parser.add_argument("-o", "--output", metavar="OUT", help="output folder (default ./outputs/anomaly)")
    add_bundle_arguments(parser, "anomaly", __doc__ or "")


def inputs_of(src, section: str | None) -> dict:
    """``inputs`` (and ``section``) for ``-i``: a datalist JSON, or the T1 volumes of a file or folder."""
    if src.is_dir() or not src.name.lower().endswith(".json"):
        no_section_for(section, src)
        return {"inputs": list(t1_inputs(src).values()) if src.is_dir() else [absolute(src)]}
    return {"inputs": absolute(src), **({"section": section} if section is not None else {})}


def run(args: argparse.Namespace) -> int:
    setup_logging()
    bundle = find_bundle(args.bundle, "anomaly", "detect")
    keys = {**inputs_of(input_path(args.input), args.section),
            "output_dir": absolute(args.output or default_output("anomaly")), **common_overrides(args)}
    if args.calibration is not None:
        keys["calibration_path"] = absolute(input_path(args.calibration, "--calibration"))
    cases = run_bundle(bundle, "inference.yaml", keys)
    flagged = sum(1 for case in cases if case["anomalous"])
    print(f"meddiff3d detect: {len(cases)} case(s), {flagged} anomalous, written to {keys['output_dir']} "
          f"(summary.json)")
    for case in cases:
        files = ", ".join(case[k] for k in ("healed", "anomaly_map", "mask", "preview"))
        print(f"  {case['id']}: {'ANOMALOUS' if case['anomalous'] else 'normal'} (volume score "
              f"{case['volume_score']:.3g}, {case['mask_voxels']} voxels flagged): {files}")
    return 0
