"""The small checks every entry point makes of user input, each written once; each raises an :class:`InputError`
whose message names the value and what is wrong with it.

They sit beside :mod:`meddiff3d.errors` at the bottom of the package (they import nothing of meddiff3d but the
errors), so the pipelines, the MONAI Label app and the command line share one wording for one mistake.

Values: :func:`check_int`, :func:`check_number`, :func:`check_choice`, :func:`check_sizes`,
:func:`parse_covariates`. Names taken from user input (datalist ids, case folders, upload names) become file names
only through :func:`safe_name`. Preflight before compute (every entry calls them before the first allocation or
write): :func:`check_output_dir`, :func:`check_voxels` (cap :data:`MAX_VOXELS`) and :func:`check_memory` (the
limit: :func:`available_memory`, or the environment variable ``MEDDIFF3D_MAX_MEMORY_GB``). :func:`raise_problems`
turns a list of problems into one error.
"""

from __future__ import annotations

import ast
import math
import os
import tempfile
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path, PureWindowsPath
from typing import Any

import numpy as np

from meddiff3d.errors import InputError

__all__ = ["check_int", "check_number", "check_choice", "check_sizes", "parse_covariates", "safe_name",
           "check_output_dir", "available_memory", "memory_limit", "check_memory", "check_voxels", "raise_problems",
           "MAX_NAME_BYTES", "MAX_VOXELS", "MEMORY_LIMIT_ENV", "MAX_REPORTED_PROBLEMS"]

#: longest name (in UTF-8 bytes) :func:`safe_name` accepts; file systems allow 255 bytes, the rest is for suffixes
MAX_NAME_BYTES = 200
#: most voxels of one volume any entry allocates from user-given sizes (or headers): 512^3 (0.5 GB as float32)
MAX_VOXELS = 512 ** 3
#: environment variable: the memory limit of :func:`check_memory` in GB (10^9 bytes), instead of the available memory
MEMORY_LIMIT_ENV = "MEDDIFF3D_MAX_MEMORY_GB"
#: at most this many problems are listed in one error message (:func:`raise_problems`)
MAX_REPORTED_PROBLEMS = 20


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) within ``[minimum, maximum]``."""
    bounded = (minimum is None or value >= minimum) and (maximum is None or value <= maximum) \
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else False
    if not bounded:
        low = "" if minimum is None else f" >= {minimum}"
        high = "" if maximum is None else f" <= {maximum}"
        raise InputError(f"{name} must be an integer{low}{' and' if low and high else ''}{high}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, minimum: float | None = None, maximum: float | None = None, *,
                 open_low: bool = False, open_high: bool = False) -> float:
    """``value`` as a finite ``float`` within the given bounds (open or closed at each end)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number)
    if ok and minimum is not None:
        ok = number > minimum if open_low else number >= minimum
    if ok and maximum is not None:
        ok = number < maximum if open_high else number <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            where = f" in {'(' if open_low else '['}{minimum:g}, {maximum:g}{')' if open_high else ']'}"
        elif minimum is not None:
            where = f" {'>' if open_low else '>='} {minimum:g}"
        elif maximum is not None:
            where = f" {'<' if open_high else '<='} {maximum:g}"
        else:
            where = ""
        raise InputError(f"{name} must be a finite number{where}, got {value!r}")
    return number


def check_choice(name: str, value: Any, choices: Sequence[str], plural: str | None = None) -> str:
    """``value`` if it is one of ``choices``; else ``unknown NAME 'x'; valid PLURAL: a, b, c``."""
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"unknown {name} {value!r}; valid {plural or name + 's'}: {', '.join(choices)}")
    return value


def check_sizes(name: str, value: Any, ndim: int = 3) -> list[int] | None:
    """``None``, one positive integer (repeated ``ndim`` times) or ``ndim`` positive integers, as a list."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value] * ndim
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != ndim:
        raise InputError(f"{name} must be {ndim} sizes (or one), got {value!r}")
    return [check_int(name, v, 1) for v in value]


def parse_covariates(value: Any, what: str = "covariates") -> dict[str, float] | None:
    """Covariates ``{name: value}`` from a mapping or its text: ``{'age': 0.7}`` or ``age=0.7, sex=1``.

    ``None``, ``{}``, ``""``, ``"none"`` and ``"null"`` mean unconditional (``None``). Every value must be a number in
    [0, 1] (the model scale); which names a model knows is checked against the model
    (:func:`meddiff3d.models.ldm.covariate_vector`).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null", "{}"):
            return None
        if text.startswith("{"):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise InputError(f"{what}: {text!r} is not a mapping like {{'age': 0.5, ...}}") from None
        else:
            pairs = [p.split("=", 1) for p in text.replace(";", ",").split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise InputError(f"{what}: {text!r} is not 'name=value, ...' and not a mapping like {{'age': 0.5}}")
            value = {k.strip(): v.strip() for k, v in pairs}
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InputError(f"{what} must map covariate names to numbers in [0, 1] (or be None: unconditional), "
                         f"got {value!r}")
    if not value:
        return None
    out = {}
    for key, raw in value.items():
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise InputError(f"{what}: {key}={raw!r} is not a number") from None
        if not (math.isfinite(number) and 0.0 <= number <= 1.0):
            raise InputError(f"{what}: {key}={number:g} is outside [0, 1] (covariates are scaled to [0, 1])")
        out[str(key)] = number
    return out


# ------------------------------------------------------------------------------------------------------ names, paths
_UNSAFE = "no path separators, '..', or control characters"


def safe_name(what: str, value: Any) -> str:
    """``value`` as a ``str`` if it is safe as one file name (or folder name) inside an output folder.

    Rejected, with an :class:`InputError` like ``datalist item id '../x' is not a safe file name (no path separators,
    '..', or control characters)``: an empty (or blank) name, ``/`` or ``\\``, ``..`` anywhere or a name of dots
    only, an absolute or drive path (``C:x``), control characters (NUL, newline, tab, ...; also line separators and
    unpaired surrogates) and names over :data:`MAX_NAME_BYTES` bytes in UTF-8. Integers are accepted (JSON ids such
    as ``7``) and returned as text; other types are rejected.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = str(int(value))
    if not isinstance(value, str):
        raise InputError(f"{what} must be a text name, got {type(value).__name__} {value!r:.80}")
    shown = repr(value) if len(value) <= 80 else repr(value[:60]) + f"... ({len(value)} characters)"
    if not value.strip():
        raise InputError(f"{what} {shown} is not a safe file name (it is empty)")
    unsafe = ("/" in value or "\\" in value or ".." in value or set(value) == {"."} or os.path.isabs(value)
              or bool(PureWindowsPath(value).drive)
              or any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in value))
    if unsafe:
        raise InputError(f"{what} {shown} is not a safe file name ({_UNSAFE})")
    size = len(value.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise InputError(f"{what} {shown} is not a safe file name ({size} bytes in UTF-8; at most {MAX_NAME_BYTES})")
    return value


def check_output_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """The absolute ``path`` of an output folder that exists or can be created, checked without creating anything.

    The folder itself, or (when it does not exist yet) its nearest existing ancestor, must be a writable folder: a
    probe file is created in it and removed. An existing file (or a broken symbolic link) where the folder or one of
    its parents should be is an error, as is a folder the user cannot write to.
    """
    try:
        target = Path(path).expanduser().absolute()
        existing = target
        while not existing.exists():
            if existing.is_symlink():
                raise InputError(f"{what} {target}: {existing} is a broken symbolic link (or a symlink loop)")
            if existing.parent == existing:
                break
            existing = existing.parent
    except (TypeError, ValueError) as err:  # NUL bytes, a non-path
        raise InputError(f"{what} {path!r} is not a usable path ({err})") from None
    if not existing.is_dir():
        which = "is" if existing == target else f"lies inside {existing}, which is"
        raise InputError(f"{what} {target} {which} an existing file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".meddiff3d-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        where = "" if existing == target else f" (its nearest existing parent {existing} is not writable)"
        raise InputError(f"{what} {target} is not writable{where}: {err.strerror or err}") from None
    return target


# ------------------------------------------------------------------------------------------------------ memory, size
def _size(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _cgroup_free() -> int | None:
    """Bytes the process's cgroup (a container's memory limit) still allows, or ``None`` without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # cgroup v1 writes a huge number for "no limit"
            return max(0, int(limit) - usage)
    return None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations: ``MemAvailable`` of ``/proc/meminfo`` (else ``os.sysconf``'s
    available pages), capped by a container's cgroup limit; ``None`` where neither is known."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            free = None
    cgroup = _cgroup_free()
    if cgroup is not None:
        free = cgroup if free is None else min(free, cgroup)
    return free


def memory_limit() -> tuple[int | None, str]:
    """``(bytes, where it comes from)``: ``MEDDIFF3D_MAX_MEMORY_GB`` (GB, 10^9 bytes) if set, else
    :func:`available_memory`."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if raw:
        gb = check_number(MEMORY_LIMIT_ENV, raw, 0.0, open_low=True)
        return int(gb * 1e9), f"the limit {MEMORY_LIMIT_ENV}={raw} allows {_size(gb * 1e9)}"
    free = available_memory()
    return free, f"{_size(free)} are available" if free is not None else "unknown"


def check_memory(what: str, nbytes: float, limit: float | None = None) -> int:
    """``nbytes`` (an estimate of what a job allocates) if it fits the memory limit, else an :class:`InputError`
    like ``num_samples=100000 needs about 59.0 GB of memory; 21.3 GB are available (set MEDDIFF3D_MAX_MEMORY_GB to
    change the limit)``.

    The limit is ``limit`` (bytes) if given, else :func:`memory_limit`: the environment variable
    ``MEDDIFF3D_MAX_MEMORY_GB`` or the memory available now. Where the available memory is unknown, nothing is
    checked.
    """
    nbytes = float(nbytes)
    if limit is not None:
        allowed, source = int(limit), f"the limit is {_size(limit)}"
    else:
        allowed, source = memory_limit()
    if allowed is not None and nbytes > allowed:
        hint = "" if limit is not None or MEMORY_LIMIT_ENV in source else \
            f" (set {MEMORY_LIMIT_ENV} to change the limit)"
        raise InputError(f"{what} needs about {_size(nbytes)} of memory; {source}{hint}")
    return int(nbytes)


def check_voxels(what: str, shape: Sequence[int], maximum: int = MAX_VOXELS) -> int:
    """The number of voxels of ``shape`` (positive sizes) if at most ``maximum`` (:data:`MAX_VOXELS`), else an
    :class:`InputError` naming ``what`` and the cap."""
    sizes = [check_int(what, int(s) if isinstance(s, (float, np.floating)) and float(s).is_integer() else s, 1)
             for s in shape]
    count = math.prod(sizes)
    if count > maximum:
        cube = round(maximum ** (1 / 3))
        cap = f"{maximum} ({cube}^3)" if cube ** 3 == maximum else str(maximum)
        raise InputError(f"{what} {tuple(sizes)} is {count:.3g} voxels; at most {cap} are allowed (MAX_VOXELS)")
    return count


# ------------------------------------------------------------------------------------------------------------ report
def raise_problems(where: str, problems: Sequence[str], error: type[InputError] = InputError) -> None:
    """Nothing if ``problems`` is empty; else raise ``error``: ``WHERE: problem`` for one, ``WHERE: N problems:``
    and one indented line per problem (at most :data:`MAX_REPORTED_PROBLEMS`, then ``... and K more``)."""
    if not problems:
        return
    if len(problems) == 1:
        raise error(f"{where}: {problems[0]}")
    shown = list(problems[:MAX_REPORTED_PROBLEMS])
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    raise error(f"{where}: {len(problems)} problems:\n  " + "\n  ".join(shown) + tail)
