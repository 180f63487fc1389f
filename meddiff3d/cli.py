"""The ``meddiff3d`` command: one sub-command per concept, each defined next to the code it runs.

A sub-command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; this file only dispatches, and
turns :class:`meddiff3d.errors.InputError` (also when wrapped by MONAI's ``Compose``) into a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
SUBCOMMANDS = {
    "synth": ("meddiff3d.data.synthetic.cli", "generate synthetic cohorts with known answers (NIfTI + datalist)"),
    "datalist": ("meddiff3d.data.preprocess", "convert BraTS / T1 cohort folders to datalists, validate datalists"),
    "label": ("meddiff3d.label.serve", "serve the bundles to 3D Slicer through MONAI Label (docs/slicer.md)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff3d", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from meddiff3d.errors import find_input_error

    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except Exception as err:  # a user-input error may arrive wrapped by MONAI/ignite; anything else is a bug
        user_error = find_input_error(err)
        if user_error is None:
            raise
        print(f"meddiff3d {args.command}: error: {user_error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
