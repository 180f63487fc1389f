"""The MONAI Label environment (``.venv-label``, built by ``make label-venv``): what goes in, and a check it works.

Run as a script with the label environment's python (it imports nothing of meddiff3d, so it works before
meddiff3d is installed there)::

    .venv-label/bin/python meddiff3d/label/env.py --requirements   # pip requirements, from setup.cfg
    .venv-label/bin/python meddiff3d/label/env.py --check          # imports monailabel + meddiff3d.label.app

Why an environment of its own: MONAI Label 0.8.5 (the latest release) needs numpy < 2, pydicom 2.4 and
``pydicom-seg``, which caps ``jsonschema < 4``; meddiff3d asks for ``jsonschema >= 4`` (bundle metadata checks, not
used by the server). The requirements are therefore setup.cfg's ``install_requires`` + extras ``label`` and
``test`` WITHOUT jsonschema, and meddiff3d itself is installed with ``--no-deps``; ``constraints.txt`` pins the rest.
"""

from __future__ import annotations

import argparse
import configparser
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: core requirements left to the label environment's own resolution (see module docstring)
DROPPED = ("jsonschema",)


def requirements(setup_cfg: Path = ROOT / "setup.cfg", extras: tuple[str, ...] = ("label", "test")) -> list[str]:
    """setup.cfg's install_requires + ``extras``, minus :data:`DROPPED`."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg)

    def lines(text: str) -> list[str]:
        return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]

    reqs = lines(cfg["options"]["install_requires"])
    for extra in extras:
        reqs += lines(cfg["options.extras_require"][extra])
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    return [r for r in reqs if name.match(r).group(0).lower() not in DROPPED]


def check() -> int:
    """Import what the server needs and report versions; non-zero exit status with the reason if anything fails."""
    try:
        import monai
        import monailabel
        import numpy
        import torch
        import torchvision

        import meddiff3d.label.app  # noqa: F401 - the app MONAI Label loads
    except Exception as err:  # noqa: BLE001 - report any import failure as a broken environment
        print(f"label environment broken: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"label environment ok: monailabel {monailabel.__version__}, monai {monai.__version__}, torch "
          f"{torch.__version__}, torchvision {torchvision.__version__}, numpy {numpy.__version__}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--requirements", action="store_true", help="print the pip requirements, one a line")
    group.add_argument("--check", action="store_true", help="check the environment imports the server")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    return check()


if __name__ == "__main__":
    raise SystemExit(main())
