"""Index a BraTS 2021/2023 folder as a meddiff3d datalist.

Same as `python -m meddiff3d datalist brats ...`; see docs/data.md. Example::

    python scripts/brats_to_datalist.py --help
"""

import sys

from meddiff3d.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["datalist", "brats", *sys.argv[1:]]))
