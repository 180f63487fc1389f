"""``meddiff3d calibrate``: calibrate the anomaly detector on healthy T1 volumes with the bundle's own
``configs/calibrate.yaml`` (merged after ``configs/common.yaml``).

    meddiff3d calibrate [--bundle B] -i HEALTHY_FOLDER | DATALIST.json [--section S] [-o CALIBRATION.json]

``-i`` is a folder of healthy T1 volumes (each file or DICOM series sub-folder a volume, or the folder one DICOM
series: a 1-volume calibration, as a folder of one file is; a temporary datalist holds them as its ``validation``
section, and the calibration records the folder as its ``healthy.datalist``) or a datalist JSON (its
``validation`` section, or ``--section``). Writes the calibration file (detector settings, heal-mask thresholds,
healthy residual statistics, the voxel and volume thresholds, model hashes) and the autoencoder baseline's beside it
(``<name>_autoencoder.json``); give it to detect with ``--calibration``. The bundle's own ``models/calibration.json``
is never written.

flag                  bundle config key          meaning
--bundle B            bundle_root                bundle folder (default: the shipped brain_mri_anomaly_ldm)
-i, --input IN        datalist                   healthy T1 folder (a temporary datalist; the folder is
                      (calibration_source)       recorded as the calibration's healthy.datalist) or a datalist JSON
--section S           calibration_section        datalist section (default: the config's, validation)
-o, --output C        calibration_path           default ./outputs/calibration/calibration.json (an existing
                                                 folder: C/calibration.json); the baseline's beside it,
                                                 baseline_calibration_path = C without .json + _autoencoder.json
--target-fpr F        target_fpr                 share of healthy brain voxels the voxel threshold may flag
--max-volumes N       calibration_max_volumes    use at most N volumes
--method M            detector#method            latent_inpainting | image_resample | autoencoder
--start-steps T ...   detector#start_steps       noise levels healed from
--steps K             detector#steps             DDIM steps over the whole schedule
--resample R          detector#resample          RePaint evaluations per step
--device D            device                     auto | cpu | cuda | cuda:N
--amp A               amp                        auto | bf16 | fp16 | none
Unset flags keep the bundle config's values (python -m monai.bundle run --key value runs the same).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from meddiff3d.errors import InputError
from meddiff3d.tasks.bundle import (absolute, add_bundle_arguments, common_overrides, datalist_input, default_output,
                                    find_bundle, input_path, run_bundle, setup_logging, t1_inputs)

__all__ = ["add_arguments", "run", "calibration_paths"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, metavar="IN",
                        help="folder of healthy T1 files (or one DICOM series folder), or datalist")
    parser.add_argument("--section", choices=("training", "validation", "test"),
                        help="datalist section (default: validation)")
    parser.add_argument("-o", "--output", metavar="C",
                        help="calibration JSON to write (default ./outputs/calibration/calibration.json)")
    parser.add_argument("--target-fpr", type=float, metavar="F")
    parser.add_argument("--max-volumes", type=int, metavar="N")
    parser.add_argument("--method", choices=("latent_inpainting", "image_resample", "autoencoder"))
    parser.add_argument("--start-steps", type=int, nargs="+", metavar="T")
    parser.add_argument("--steps", type=int, metavar="K")
    parser.add_argument("--resample", type=int, metavar="R")
    add_bundle_arguments(parser, "anomaly", __doc__ or "")


def calibration_paths(output: str | None) -> tuple[Path, Path]:
    """``(calibration file, baseline calibration file)`` for ``-o``."""
    path = Path(output).expanduser() if output else default_output("calibration") / "calibration.json"
    if path.is_dir():
        path = path / "calibration.json"
    if not path.name.lower().endswith(".json"):
        raise InputError(f"-o {output}: give the calibration JSON file to write (e.g. {path}.json), or a folder")
    path = Path(absolute(path))
    return path, path.with_name(f"{path.name[:-len('.json')]}_autoencoder.json")


def overrides(args: argparse.Namespace) -> dict:
    """The config keys the flags set, but ``datalist`` / ``calibration_section`` (what ``-i`` becomes)."""
    out, baseline = calibration_paths(args.output)
    keys = {"target_fpr": args.target_fpr, "calibration_max_volumes": args.max_volumes,
            "detector#method": args.method, "detector#start_steps": args.start_steps, "detector#steps": args.steps,
            "detector#resample": args.resample}
    return {**{k: v for k, v in keys.items() if v is not None}, "calibration_path": str(out),
            "baseline_calibration_path": str(baseline), **common_overrides(args)}


def healthy_datalist(src: Path, out: Path) -> str:
    """Write a datalist ``out`` of the T1 volumes of the folder ``src`` (each file or DICOM series sub-folder a volume,
    or ``src`` itself one DICOM series: :func:`~meddiff3d.tasks.bundle.t1_inputs`), all in the ``validation``
    section (returned)."""
    from meddiff3d.data.datalist import write_datalist

    items = [{"id": case, "image": path} for case, path in t1_inputs(src).items()]
    write_datalist(out, {"validation": items}, modalities=["t1"],
                   description=f"healthy T1 folder {src} (meddiff3d calibrate)")
    return "validation"


def run(args: argparse.Namespace) -> int:
    setup_logging()
    bundle = find_bundle(args.bundle, "anomaly", "calibrate")
    src = input_path(args.input)
    keys = overrides(args)
    with datalist_input("calibrate", src, args.section, healthy_datalist,
                        "a folder of healthy T1 files or a datalist JSON", section_key="calibration_section") as given:
        source = {"calibration_source": absolute(src)} if src.is_dir() else {}  # recorded, not the temporary datalist
        summary = run_bundle(bundle, "calibrate.yaml", {**keys, **given, **source})
    detector = summary["detector"]
    print(f"meddiff3d calibrate: {detector['method']} calibrated on {detector['volumes']} volume(s): voxel "
          f"threshold z > {detector['threshold']:.3g}, volume threshold {detector['volume_threshold']:.3g}")
    for role in ("detector", "baseline"):
        if role in summary:
            print(f"  {summary[role]['calibration']}  ({summary[role]['method']})")
    print(f"use it: meddiff3d detect -i T1_FILE_OR_FOLDER --calibration {detector['calibration']}")
    return 0
