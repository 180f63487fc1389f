"""One served request: where its upload goes, the names its user knows its images by, and its time limit.

- **Uploads** (:func:`save_upload`): the file of an infer request is written into that request's scratch folder
  under the upload's own file name (checked by :func:`meddiff3d.checks.safe_name`; MONAI Label's client sends its
  full local path, of which only the last part counts), and the folder is removed when the request ends, success or
  failure (:mod:`meddiff3d.label.server`).
- **Names** (:class:`RequestNames`): error messages name the user's image (the upload's file name, the datastore
  image id), never the server's scratch or datastore paths; every server path a request uses is registered with the
  name to show instead.
- **Grid cap** (:func:`check_input_grid`): every image a request reads (a segmentation or anomaly input, the
  generation reference, whose grid the result is written on) has at most :data:`MAX_REQUEST_VOXELS` voxels, read from
  its header before any voxel is.
- **Time limit** (:func:`call_with_timeout`): a request still computing after ``timeout`` seconds is stopped by
  raising :class:`RequestTimeout` in its own thread, which unwinds (scratch files removed) and is free for the next
  request; no computing thread is left behind. The exception arrives between two Python bytecodes, so one long
  native call (a single large convolution) finishes first.

Plain Python (no MONAI Label): unit-tested in the core environment.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

from meddiff3d.checks import MAX_VOXELS, check_voxels, safe_name

__all__ = ["DEFAULT_TIMEOUT_S", "MAX_REQUEST_VOXELS", "RequestTimeout", "RequestNames", "upload_name", "save_upload",
           "check_input_grid", "call_with_timeout"]

#: seconds one infer request may compute before it is stopped (``meddiff3d label serve --timeout``; 0: no limit)
DEFAULT_TIMEOUT_S = 600.0
#: most voxels of the grid of any image one request reads or writes: an eighth of
#: :data:`meddiff3d.checks.MAX_VOXELS` (256^3), as a request holds several float copies of its grid and sends the
#: result over HTTP; BraTS (240x240x155) and 1 mm brain MRI (256x256x176) fit
MAX_REQUEST_VOXELS = MAX_VOXELS // 8
#: name of an upload sent without a file name (MONAI Label's own default suffix)
UNNAMED_UPLOAD = "upload.nii.gz"

T = TypeVar("T")


class RequestTimeout(BaseException):
    """A request ran past its time limit. A ``BaseException`` (like ``KeyboardInterrupt``), so the ``except
    Exception`` of a pipeline does not swallow it on its way out."""


def upload_name(filename: str | None) -> str:
    """The file name an upload is stored (and named in messages) under: the last part of the client's ``filename``
    (``/`` or ``\\`` separated), checked by :func:`~meddiff3d.checks.safe_name`; :data:`UNNAMED_UPLOAD` if none."""
    if not filename:
        return UNNAMED_UPLOAD
    return safe_name("uploaded file name", filename.replace("\\", "/").rsplit("/", 1)[-1])


def save_upload(source: IO[bytes], filename: str | None, folder: str | os.PathLike) -> Path:
    """Copy an upload's bytes to ``folder/<upload_name(filename)>`` (``folder`` is created); returns the file."""
    path = Path(folder) / upload_name(filename)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out)
    return path


def check_input_grid(path: str | os.PathLike, what: str = "image"):
    """The header (:class:`~meddiff3d.data.images.ImageInfo`) of an image a request reads, its spatial grid within
    :data:`MAX_REQUEST_VOXELS`; nothing but the header is read. Raises :class:`~meddiff3d.errors.InputError`."""
    from meddiff3d.data.images import check_image

    info = check_image(path, read_data=False)
    check_voxels(f"{what} {path}: grid", info.shape, MAX_REQUEST_VOXELS)
    return info


class RequestNames:
    """Server paths of one request -> the names its user knows them by, to rewrite messages with.

    ``add(path, name)`` maps a file (as given, absolute and resolved, and its bare file name when it is a scratch
    file of a fixed name) to ``name``; ``add_folder(folder)`` drops a server folder from the paths inside it, leaving
    the file names. :meth:`message` applies all of them in one pass, longest first.
    """

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._basenames: dict[str, str] = {}
        self._folders: set[str] = set()

    def add(self, path: str | os.PathLike, name: str, *, basename: bool = False) -> None:
        for form in (str(path), os.path.abspath(path), os.path.realpath(path)):
            self._names.setdefault(form, name)
        if basename:
            self._basenames.setdefault(Path(path).name, name)

    def add_folder(self, folder: str | os.PathLike) -> None:
        self._folders.update(f.rstrip(os.sep) for f in (str(folder), os.path.realpath(folder)) if f.strip(os.sep))

    def name_of(self, path: str | os.PathLike) -> str:
        """The user's name for ``path``: registered, else its file name."""
        return self._names.get(str(path)) or self._names.get(os.path.realpath(path)) or Path(path).name

    def message(self, text: str) -> str:
        """``text`` with every registered path replaced by its name, and registered folders dropped."""
        table = {**{folder + os.sep: "" for folder in self._folders}, **self._names}
        patterns = [re.escape(key) for key in sorted(table, key=len, reverse=True)]
        # a bare file name only where it is not part of a longer name or path
        patterns += [rf"(?<![\w./\\-]){re.escape(key)}(?![\w.-])"
                     for key in sorted(self._basenames, key=len, reverse=True)]
        if not patterns:
            return text
        return re.sub("|".join(patterns),
                      lambda m: table[m.group(0)] if m.group(0) in table else self._basenames[m.group(0)], text)


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` asynchronously in the thread ``thread_id`` (``None``: withdraw a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


def call_with_timeout(fn: Callable[..., T], timeout: float | None, *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in this thread, stopped by :class:`RequestTimeout` once it has run ``timeout``
    seconds (``None`` or ``0``: no limit). A result that arrives just as the time runs out is kept."""
    if not timeout:
        return fn(*args, **kwargs)
    thread_id, lock, state = threading.get_ident(), threading.Lock(), {"now": "running"}

    def expire() -> None:
        with lock:
            if state["now"] == "running":
                state["now"] = "expired"
                _raise_in(thread_id, RequestTimeout)

    timer = threading.Timer(timeout, expire)
    timer.daemon = True
    try:
        timer.start()
        return fn(*args, **kwargs)
    finally:
        timer.cancel()
        with lock:
            expired, state["now"] = state["now"] == "expired", "done"
        if expired:  # raised already (we are unwinding it), or still pending after fn returned: withdraw it
            _raise_in(thread_id, None)

