"""Convert a T1 cohort (NIfTI/NRRD/DICOM) to 1 mm RAS NIfTI + a meddiff3d datalist.

Same as `python -m meddiff3d datalist t1 ...`; see docs/data.md. Example::

    python scripts/t1_cohort_to_datalist.py --help
"""

import sys

from meddiff3d.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["datalist", "t1", *sys.argv[1:]]))
