"""The small checks every entry point makes of user input, each written once; each raises an :class:`InputError`
whose message names the value and what is wrong with it.

They sit beside :mod:`meddiff3d.errors` at the bottom of the package (they import nothing of meddiff3d but the
errors), so the pipelines, the MONAI Label app and the command line share one wording for one mistake.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from meddiff3d.errors import InputError

__all__ = ["check_int", "check_number", "check_choice", "check_sizes", "parse_covariates"]


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
