"""Request parameters of the three served models: declared once, validated with messages that name the value.

A model's :class:`ParamSpec` tuple is both its ``config`` in ``/info/`` (what Slicer's MONAI Label module shows as
editable options: a list becomes a drop-down whose first entry is the default) and the parser of a request's
``params``. MONAI Label merges the task config into every request, so an untouched option arrives as the whole
choice list and means "the default". :func:`parse_params` reads the declared keys only (the task's own request also
holds MONAI Label's keys: ``model``, ``image``, ``device`` ...).

What a client sends is checked before anything runs: :func:`parse_params_json` (the ``params`` form field must be a
JSON object) and :func:`check_param_names` (only the model's parameters and :data:`CLIENT_KEYS`; a mistyped name
gets a "did you mean").
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from meddiff3d.checks import parse_covariates
from meddiff3d.diffusion import SAMPLERS
from meddiff3d.errors import InputError

__all__ = ["ParamSpec", "parse_params", "parse_params_json", "check_param_names", "config_of", "SEGMENTATION_PARAMS",
           "ANOMALY_PARAMS", "GENERATION_PARAMS", "SAMPLER_CHOICES", "MODEL_OWN", "CLIENT_KEYS"]

#: keys MONAI Label's clients add to every request (Slicer's module: ``result_extension``, ``result_dtype``; both
#: clients: ``client_id``); accepted and ignored, the results have their own formats
CLIENT_KEYS = ("client_id", "result_extension", "result_dtype", "result_compress")

#: samplers offered to clients: meddiff3d.diffusion.SAMPLERS, the deterministic ones first (ddpm, the one stochastic
#: sampler, last), so segmentation's drop-down starts with its default ddim (generation's with MODEL_OWN)
SAMPLER_CHOICES = tuple(sorted(SAMPLERS, key=lambda name: (name == "ddpm", name != "ddim")))
#: the generation sampler choice that means "as the model file's meta says" (``sampler: null`` of the bundle config)
MODEL_OWN = "model"


@dataclass(frozen=True)
class ParamSpec:
    """One request parameter: ``kind`` is ``"int"``, ``"float"``, ``"choice"`` or ``"covariates"``."""

    name: str
    kind: str
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = field(default=())
    help: str = ""

    def config_value(self) -> Any:
        """The value shown in ``/info/`` (choices: the list, default first)."""
        if self.kind == "choice":
            return [self.default, *[c for c in self.choices if c != self.default]]
        return "" if self.default is None else self.default

    def parse(self, value: Any) -> Any:
        if value is None or (isinstance(value, str) and value.strip() == ""):
            return self.default
        if self.kind == "choice":
            return self._choice(value)
        if self.kind == "covariates":
            return parse_covariates(value, f"parameter {self.name!r}")
        return self._number(value)

    def _choice(self, value: Any) -> str:
        if isinstance(value, (list, tuple)):
            if list(value) == self.config_value():  # the untouched option list from the model config
                return self.default
            if len(value) != 1:
                raise InputError(f"parameter {self.name!r} must be one of {', '.join(self.choices)}, got {value!r}")
            value = value[0]
        if not isinstance(value, str) or value not in self.choices:
            raise InputError(f"parameter {self.name!r} must be one of {', '.join(self.choices)}, got {value!r}")
        return value

    def _number(self, value: Any) -> int | float:
        text = value.strip() if isinstance(value, str) else value  # Slicer's options table sends text
        try:
            if isinstance(text, bool):
                raise ValueError
            number = float(text)
        except (TypeError, ValueError):
            raise InputError(f"parameter {self.name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise InputError(f"parameter {self.name!r} must be finite, got {value!r}")
        if self.kind == "int":
            if number != int(number):
                raise InputError(f"parameter {self.name!r} must be an integer, got {value!r}")
            number = int(number)
        low = "" if self.minimum is None else f" >= {self.minimum:g}"
        high = "" if self.maximum is None else f" <= {self.maximum:g}"
        if (self.minimum is not None and number < self.minimum) or (self.maximum is not None and number > self.maximum):
            raise InputError(f"parameter {self.name!r} must be{low}{' and' if low and high else ''}{high}, "
                             f"got {value!r}")
        return number


def parse_params(specs: Sequence[ParamSpec], request: Mapping[str, Any]) -> dict[str, Any]:
    """The declared parameters of ``request``, validated (defaults for the missing); raises :class:`InputError`."""
    return {spec.name: spec.parse(request.get(spec.name)) for spec in specs}


def parse_params_json(text: str | bytes | None) -> dict[str, Any]:
    """The ``params`` form field of a request: a JSON object (empty text: ``{}``); raises :class:`InputError`."""
    if text is None or not str(text if isinstance(text, str) else text.decode("utf-8", "replace")).strip():
        return {}
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"params is not valid JSON ({err}); send an object such as {{\"steps\": 10}}") from None
    if not isinstance(value, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        raise InputError(f"params must be a JSON object {{name: value}}, got {kind}: {str(text)[:80]}")
    return value


def check_param_names(specs: Sequence[ParamSpec], request: Mapping[str, Any], extra: Sequence[str] = (),
                      model: str = "this model") -> None:
    """Refuse names of ``request`` that are neither a parameter of ``specs``, nor in ``extra``, nor a client key
    (:data:`CLIENT_KEYS`), with a "did you mean" for a near miss."""
    known = [spec.name for spec in specs] + list(extra)
    unknown = [str(name) for name in request if name not in known and name not in CLIENT_KEYS]
    if not unknown:
        return
    hints = [f"{name!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(name, known, 1, 0.6))
             else repr(name) for name in unknown]
    raise InputError(f"unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)} for {model}; its "
                     f"parameters: {', '.join(known)}")


def config_of(specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """A model's ``config`` for ``/info/`` (Slicer shows it as options)."""
    return {spec.name: spec.config_value() for spec in specs}


_STEPS = dict(minimum=1, maximum=1000)
SEGMENTATION_PARAMS = (
    ParamSpec("result", "choice", "label", choices=("label", "prob", "variance", "entropy"),
              help="label: BraTS label map (.seg.nrrd); prob/variance/entropy: float volume of one region (NIfTI)"),
    ParamSpec("region", "choice", "WT", choices=("WT", "TC", "ET"), help="region of a float result"),
    ParamSpec("num_samples", "int", 3, minimum=1, maximum=64, help="ensemble size"),
    ParamSpec("steps", "int", 10, **_STEPS),
    ParamSpec("sampler", "choice", "ddim", choices=SAMPLER_CHOICES),
    ParamSpec("seed", "int", 0, minimum=0, maximum=2**31 - 1),
    ParamSpec("threshold", "float", 0.5, minimum=1e-6, maximum=1 - 1e-6),
)
ANOMALY_PARAMS = (
    ParamSpec("result", "choice", "mask", choices=("mask", "anomaly_map", "healed"),
              help="mask: binary segmentation (.seg.nrrd); anomaly_map / healed: float volume (NIfTI)"),
)
GENERATION_PARAMS = (
    ParamSpec("covariates", "covariates", None, help="e.g. age=0.7, sex=1 (model scale [0, 1]); empty: unconditional"),
    ParamSpec("steps", "int", None, **_STEPS, help="empty: the model's own (its file's meta 'sampling')"),
    ParamSpec("sampler", "choice", MODEL_OWN, choices=(MODEL_OWN, *SAMPLER_CHOICES),
              help="model: the model's own (its file's meta 'sampling')"),
    ParamSpec("seed", "int", 0, minimum=0, maximum=2**31 - 1),
    ParamSpec("guidance_scale", "float", 1.0, minimum=0.0, maximum=50.0),
)
