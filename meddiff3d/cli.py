"""The ``meddiff3d`` command: one sub-command per concept, each defined next to the code it runs.

A sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, and
turns :class:`meddiff3d.errors.InputError` (also when wrapped by MONAI's ``Compose``) into a one-line message and exit
status 2, as it does an ``OSError`` or ``MemoryError`` the machine raises meanwhile (full disk, memory taken by
others); Ctrl-C exits 130 with one line.
The models themselves (generation, segmentation, anomaly detection, training) run as MONAI bundles through
``python -m monai.bundle run``; ``--help`` says so, with a command that works from any bundle folder. The task
commands (``generate``, ``segment``, ``detect``, ``calibrate``: :mod:`meddiff3d.tasks`) run a bundle's own configs
on plain inputs, each flag one config key.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from meddiff3d import __version__

# name -> (module, one-line help, what it is for / an example, shown under the command list of --help)
SUBCOMMANDS = {
    "generate": ("meddiff3d.tasks.generate",
                 "generate T1 brain volumes with the generation bundle (brain_mri_ldm)",
                 "the bundle's own inference (configs/inference.yaml); each flag sets one of its config keys.\n"
                 "  meddiff3d generate --covariates age=0.7,sex=1 --num-samples 2 -o outputs/generation"),
    "segment": ("meddiff3d.tasks.segment",
                "segment BraTS tumours in a case folder, a folder of cases or a datalist (brats_mri_segdiff)",
                "the bundle's own inference (configs/inference.yaml) on plain BraTS-named files; each flag sets one\n"
                "of its config keys.\n"
                "  meddiff3d segment -i /data/BraTS2021_00000 -o outputs/segmentation"),
    "detect": ("meddiff3d.tasks.detect",
               "detect anomalies in a T1 file or DICOM series folder, a folder of them, or a datalist "
               "(brain_mri_anomaly_ldm)",
               "the bundle's own inference (configs/inference.yaml), thresholds from a calibration; each flag sets\n"
               "one of its config keys.\n"
               "  meddiff3d detect -i /data/t1 --calibration outputs/calibration/calibration.json -o outputs/anomaly"),
    "calibrate": ("meddiff3d.tasks.calibrate",
                  "calibrate the anomaly detector on a folder of healthy T1 files or a datalist",
                  "the bundle's own configs/calibrate.yaml; writes a calibration JSON for detect --calibration\n"
                  "(never into the bundle).\n"
                  "  meddiff3d calibrate -i /data/healthy_t1 -o outputs/calibration/calibration.json"),
    "synth": ("meddiff3d.data.synthetic.cli",
              "generate synthetic cohorts with known answers (NIfTI + datalist)",
              "healthy T1 brains, BraTS-like tumour cases (4 sequences + labels) or T1 brains with lesions, each\n"
              "with a datalist.json the bundles read; for trying the bundles without patient data.\n"
              "  meddiff3d synth brats --n 8 --out data/brats_synth --shape 64 96 64 --source procedural"),
    "datalist": ("meddiff3d.data.preprocess",
                 "convert BraTS / T1 cohort folders to datalists, validate datalists",
                 "index your own data for the bundles: a BraTS 2021/2023 folder, a T1 cohort (converted to 1 mm RAS\n"
                 "160x224x160, optional N4 and covariates CSV), or check an existing datalist before a long run.\n"
                 "  meddiff3d datalist brats /data/BraTS2021 --out data/brats.json\n"
                 "  meddiff3d datalist validate data/brats.json --require-label"),
    "convert-model-zoo": ("meddiff3d.models.model_zoo",
                          "convert the MONAI model-zoo brain LDM weights into meddiff3d model files",
                          "run the official brain_image_synthesis_latent_diffusion_model weights in bundles/brain_mri_ldm\n"
                          "(configs/inference_anchor.yaml reads models/model_zoo/ there).\n"
                          "  meddiff3d convert-model-zoo <zoo>/models/autoencoder.pt <zoo>/models/model.pt "
                          "models/model_zoo"),
    "label": ("meddiff3d.label.serve",
              "serve the bundles to 3D Slicer through MONAI Label (docs/slicer.md)",
              "start a MONAI Label server (offline) that 3D Slicer's MONAI Label module connects to: segment a\n"
              "BraTS case, detect anomalies in a T1, or generate a T1, from inside Slicer.\n"
              "  meddiff3d label serve --studies data/brats_synth/images"),
}

DESCRIPTION = f"""\
meddiff3d {__version__}: 3D diffusion models for brain MRI, shipped as MONAI bundles (bundles/):
  brain_mri_ldm           generate T1 brain volumes (latent diffusion, optional covariates)
  brats_mri_segdiff       segment BraTS tumours (WT/TC/ET) with uncertainty maps (diffusion ensemble)
  brain_mri_anomaly_ldm   detect and localise anomalies in T1 volumes (diffusion healing)

generate, segment, detect and calibrate run a bundle's own configs on plain files and folders (outputs in
./outputs/<task> unless -o says otherwise). Train and evaluate a bundle, or run any of its configs, with MONAI's
bundle runner, from the bundle's folder, e.g.
  cd bundles/brain_mri_ldm
  python -m monai.bundle run --config_file "['configs/common.yaml','configs/inference.yaml']"
(each bundle's docs/README.md lists its commands, inputs and outputs). The other commands prepare data and serve
the bundles to 3D Slicer."""


def _epilog() -> str:
    blocks = [f"{name}: {text}" for name, (_, _, text) in SUBCOMMANDS.items()]
    return ("what each command does:\n\n" + "\n\n".join(blocks)
            + "\n\n'meddiff3d COMMAND --help' lists a command's options.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff3d", description=DESCRIPTION, epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"meddiff3d {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, title="commands")
    for name, (module_name, help_text, long_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=f"{help_text}\n\n{long_text}",
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from meddiff3d.errors import find_input_error

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"meddiff3d {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a user-input error may arrive wrapped by MONAI/ignite; anything else is a bug
        user_error = find_input_error(err)
        if user_error is None and isinstance(err, (OSError, MemoryError)):
            # the machine's, not the code's: a full disk, a folder made read-only meanwhile, memory taken by others
            # (the commands check sizes and folders before they start; this is what is left)
            what = "out of memory" if isinstance(err, MemoryError) else (err.strerror or type(err).__name__)
            where = f": {err.filename}" if getattr(err, "filename", None) else ""
            print(f"meddiff3d {args.command}: error: {what}{where}", file=sys.stderr)
            return 2
        if user_error is None:
            raise
        print(f"meddiff3d {args.command}: error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
