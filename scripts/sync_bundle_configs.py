"""Copy the shared config fragments of configs/ into the bundles that use them, so each bundle folder stands alone.

    .venv/bin/python scripts/sync_bundle_configs.py [--check]

configs/ is the one source of truth. A copy (bundles/<name>/configs/{presets,data}/*.yaml) is the source behind a
two-line header naming it; this script rewrites every copy from its source (``--check``: only report the stale ones,
exit status 1). tests/test_bundle_conventions.py fails while a copy differs. To give a bundle a new copy, write the
header line ``# Copy of configs/<source>.yaml (meddiff3d repository)`` into the new file and run this script.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = ("# Copy of {source} (meddiff3d repository; the one source of truth): edit that file, then run\n"
          "# `python scripts/sync_bundle_configs.py`; tests/test_bundle_conventions.py checks the copy.\n")
HEADER_SOURCE = re.compile(r"# Copy of (configs/\S+\.yaml) \(meddiff3d repository")


def source_of(copy: Path) -> Path | None:
    """The configs/ file a bundle copy names in its first line (None for a bundle's own file)."""
    with copy.open() as f:
        match = HEADER_SOURCE.match(f.readline())
    return ROOT / match.group(1) if match else None


def bundle_copies() -> list[Path]:
    """Every copy of a configs/ fragment inside bundles/, sorted."""
    files = sorted((ROOT / "bundles").glob("*/configs/*/*.yaml"))
    return [f for f in files if source_of(f) is not None]


def expected_copy(copy: Path) -> str:
    """What ``copy`` must hold: the header, then its source verbatim."""
    source = source_of(copy)
    return HEADER.format(source=source.relative_to(ROOT).as_posix()) + source.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale copies, write nothing")
    args = parser.parse_args(argv)
    stale = [c for c in bundle_copies() if c.read_text() != expected_copy(c)]
    for copy in stale:
        print(("stale: " if args.check else "updated: ") + copy.relative_to(ROOT).as_posix())
        if not args.check:
            copy.write_text(expected_copy(copy))
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
