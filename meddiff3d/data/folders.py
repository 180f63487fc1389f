"""User folders as conversions meet them: listing that reports what it cannot read, and all-or-nothing output.

:func:`scan_folder` lists a folder (optionally recursively, following symbolic links to folders, each real folder
once) and reports every entry it cannot use - a broken symbolic link, a symlink loop, an unreadable folder - instead
of dropping it, so a conversion never loses a subject silently. :func:`staged_folder` lets a conversion write a
whole dataset into a temporary folder beside its target and renames it into place only when every subject succeeded:
a failure (or a kill) leaves no half-converted cohort behind. :func:`dicom_series_folder` tells a folder that is
itself one DICOM series (one volume) from a folder of volumes, and refuses one that is both or several series.
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

from meddiff3d.checks import check_output_dir, raise_problems
from meddiff3d.errors import InputError

__all__ = ["series_ids", "scan_folder", "staged_folder", "dicom_series_folder"]

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


def dicom_series_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is itself one DICOM series: the slice files of one volume directly in it (the series as
    :func:`~meddiff3d.data.images.read_sitk` reads it, SimpleITK/GDCM), nothing else that is a volume.

    ``False`` for a folder of image files or of series sub-folders (each one a volume). An :class:`InputError`
    naming ``folder`` when it cannot be either: the slices of several series in it, DICOM slices beside image files
    or beside series sub-folders, ``.dcm`` files that form no readable series, or (a series folder) entries that
    cannot be read (:func:`scan_folder`'s problems: a slice behind a broken link would be missing from the volume).
    GDCM looks at the folder only when it holds files that are no NIfTI/NRRD/MetaImage file.
    """
    from meddiff3d.data.images import ITK_SUFFIXES, NIFTI_SUFFIXES

    problems: list[str] = []
    entries = scan_folder(folder, problems)
    files = [path for path, is_folder in entries if not is_folder]
    images = [path.name for path in files if path.name.lower().endswith(NIFTI_SUFFIXES + ITK_SUFFIXES)]
    if len(images) == len(files):
        return False
    series = series_ids(folder)
    if not series:
        dcm = [path.name for path in files if path.name.lower().endswith(".dcm")]
        if dcm:
            raise InputError(f"{folder}: {len(dcm)} .dcm file(s) ({_some(dcm)}) that form no DICOM series SimpleITK "
                             f"can read (damaged, or no image slices); remove them or give a readable series' folder")
        return False
    if len(series) > 1:
        raise InputError(f"{folder}: holds the slices of {len(series)} DICOM series; give each series its own "
                         f"sub-folder (one volume each), or give one series' folder")
    sub = [path.name for path, is_folder in entries if is_folder and series_ids(path)]
    if images or sub:
        beside = f"image files ({_some(images)})" if images else f"DICOM series sub-folders ({_some(sub)})"
        raise InputError(f"{folder}: holds DICOM slices beside {beside}; give a folder of one kind (the slices of "
                         f"one series, image files, or series sub-folders)")
    raise_problems(f"DICOM series folder {folder}", problems)
    return True


def series_ids(folder: str | os.PathLike) -> tuple[str, ...]:
    """The DICOM series UIDs of the files directly in ``folder`` (GDCM), without ITK's "No Series were found"."""
    import SimpleITK as sitk

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _some(names: list[str]) -> str:
    return names[0] + (f" and {len(names) - 1} more" if len(names) > 1 else "")


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
