"""User folders as conversions meet them: listing that reports what it cannot read, and all-or-nothing output.

:func:`scan_folder` lists a folder (optionally recursively, following symbolic links to folders, each real folder
once) and reports every entry it cannot use - a broken symbolic link, a symlink loop, an unreadable folder - instead
of dropping it, so a conversion never loses a subject silently. :func:`staged_folder` lets a conversion write a
whole dataset into a temporary folder beside its target and renames it into place only when every subject succeeded:
a failure (or a kill) leaves no half-converted cohort behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator

from meddiff3d.checks import check_output_dir
from meddiff3d.errors import InputError

__all__ = ["scan_folder", "staged_folder"]

log = logging.getLogger(__name__)


def scan_folder(folder: str | os.PathLike, problems: list[str], *, recursive: bool = False) -> list[tuple[Path, bool]]:
    """``[(path, is_folder)]`` of the entries of ``folder`` (sorted; names starting with ``.`` are left out).

    ``recursive`` descends into sub-folders (following symbolic links, each real folder once; a link back into the
    tree is skipped with a warning) and lists files only. Entries that cannot be used - a broken symbolic link or a
    symlink loop, an entry or a folder that cannot be read - are appended to ``problems`` as ``PATH: what``.
    """
    found: list[tuple[Path, bool]] = []
    pending = [Path(folder)]
    seen: set[tuple[int, int]] = set()
    try:
        info = os.stat(folder)
        seen.add((info.st_dev, info.st_ino))
    except OSError as err:
        problems.append(f"{folder}: unreadable folder ({err.strerror or err})")
        return found
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as err:
            problems.append(f"{current}: unreadable folder ({err.strerror or err})")
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                info = os.stat(entry.path)  # follows symbolic links
            except OSError as err:
                what = "broken symbolic link or symlink loop" if entry.is_symlink() else "unreadable entry"
                problems.append(f"{path}: {what} ({err.strerror or err})")
                continue
            is_folder = stat.S_ISDIR(info.st_mode)
            if is_folder and recursive:
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    log.warning("%s: a folder already listed (a symbolic link back into the tree); skipped", path)
                    continue
                seen.add(key)
                pending.append(path)
            elif is_folder or stat.S_ISREG(info.st_mode):
                found.append((path, is_folder))
    return sorted(found)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike, what: str = "output folder") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; when the block succeeds it becomes ``target``, when it
    fails the temporary folder (and any parent folder made for it) is removed and ``target`` left untouched.

    ``target`` must not exist yet or be an empty folder (checked first, with :func:`~meddiff3d.checks.check_output_dir`,
    before anything is created), so a conversion never mixes its output with earlier files.
    """
    target = check_output_dir(target, what)
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{what} {target} already exists and is not empty; give a new folder (the conversion "
                         f"writes it whole)")
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; give the folder what mkdir would
        os.replace(staging, target)  # an empty target folder is replaced
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in missing:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
