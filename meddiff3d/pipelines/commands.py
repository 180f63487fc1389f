"""Bundle entry points, with user errors turned into one line and exit status 2.

``python -m monai.bundle run`` wraps any exception of a config component in a chain of ``RuntimeError`` s ("Failed to
instantiate ..."), burying the message that matters. Two ways out, one rule: an :class:`~meddiff3d.errors.InputError`
anywhere in the chain is printed as ``error: <message>`` on stderr and the process exits with status 2; other errors
are bugs and keep their traceback.

- :func:`report_user_errors`, every bundle config's ``initialize``: for a ``run`` that drives the config's components
  (``$@evaluator.run()``), whose user errors surface while MONAI instantiates them. It installs a ``sys.excepthook``,
  so only an exception that ends the process is reported; a program that catches it (a server, a test, a
  ``ConfigWorkflow`` in a notebook) sees the exception unchanged.
- :func:`check_command_line`, also in ``initialize``: under ``python -m monai.bundle run``, every ``--key`` must
  name a key of the merged configs (or an argument of ``run``); MONAI would add a mistyped ``--stepz 5`` as a new
  key and run with the default.
- the wrapped pipeline functions below (:func:`user_command`), for ``run`` entries that are one recipe call (training,
  data generation); ``SystemExit`` is not an ``Exception``, so MONAI lets it through.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Callable

from meddiff3d.errors import InputError, find_input_error

__all__ = ["report_user_errors", "check_command_line", "user_command", "generate", "train_latent_diffusion",
           "distil_latent_diffusion", "train_autoencoder", "synthetic_datalist", "calibrate_anomaly",
           "detect_anomalies", "evaluate_anomaly", "train_segmentation_diffusion", "segment", "evaluate_segmentation",
           "train_image_diffusion", "synthetic_slice_datalist"]


def _exit_for_user_error(err: BaseException) -> None:
    """``error: <message>`` on stderr and exit status 2 if ``err`` (or its cause chain) is a user error."""
    user_error = find_input_error(err)
    if user_error is not None:
        sys.stdout.flush()
        print(f"error: {user_error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def report_user_errors() -> None:
    """Make a user error that ends the process one ``error:`` line with exit status 2 (a bundle's ``initialize``);
    any other uncaught exception keeps the previous hook (a traceback). Installing it twice changes nothing."""
    previous = sys.excepthook
    if getattr(previous, "meddiff3d_user_errors", False):
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        _exit_for_user_error(exc)  # a SystemExit raised here ends the interpreter with that status
        previous(exc_type, exc, tb)

    hook.meddiff3d_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError):
            raise InputError(f"--config_file {value!r} is not a list of file names") from None
    return [v for v in value.split(",") if v] if not Path(value).is_file() and "," in value else [value]


def _flags(args: list[str]) -> dict[str, str | None]:
    """``--name value`` / ``--name=value`` pairs of a fire command line (``--name`` alone: a flag)."""
    flags: dict[str, str | None] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            flags[name] = value if (eq or value) else None
        i += 1
    return flags


def check_command_line(argv: list[str] | None = None) -> None:
    """Refuse a ``--key`` of a ``python -m monai.bundle run`` command line that names no top-level key of the merged
    config files (nor an argument of MONAI's ``run``), or an argument a component does not take
    (``--inferer#stepz``), with a "did you mean" line. Elsewhere (a program building a ``ConfigWorkflow``, a server)
    it does nothing."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py") or argv[1] != "run":
        return
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import run

    flags = _flags(argv[2:])
    if "args_file" in flags or not flags.get("config_file"):
        return  # keys come from elsewhere; MONAI reports a missing config file itself
    config = ConfigParser.load_config_files(_config_files(str(flags["config_file"])))
    allowed = set(inspect.signature(run).parameters) - {"override"}
    for name in flags:
        top, *rest = re.split(r"#|::", name)
        if top in allowed or top.startswith("_meta_"):
            continue
        if top not in config:
            raise InputError(f"unknown config key --{name}: no config file of this command has {top!r}"
                             f"{_did_you_mean(top, config)}")
        _check_component_argument(name, config[top], rest)


def _did_you_mean(key: str, options: Any) -> str:
    close = difflib.get_close_matches(key, sorted(str(o) for o in options), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_component_argument(name: str, value: Any, path: list[str]) -> None:
    """``--component#argument``: the argument must be one the component's ``_target_`` takes (MONAI would pass a
    mistyped one on, and the component would fail with a TypeError)."""
    from pydoc import locate

    for key in path:
        if not isinstance(value, dict) or key in value:
            value = value.get(key) if isinstance(value, dict) else None
            continue
        target = value.get("_target_")
        fn = locate(target) if isinstance(target, str) else None
        if fn is None:
            return  # a plain mapping (e.g. covariates): a new key is the user's to add
        params = inspect.signature(fn).parameters
        if key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        options = [p for p in params if not p.startswith("_")]
        raise InputError(f"unknown config key --{name}: {target} takes no argument {key!r}"
                         f"{_did_you_mean(key, options)}")


def user_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with user-input errors ending the process: one line on stderr, exit status 2."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - only user errors are turned into an exit status
            _exit_for_user_error(err)
            raise

    return run


def _lazy(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``{module}.{name}`` (imported when called)."
    return call


generate = user_command(_lazy("meddiff3d.pipelines.generation", "generate"))
train_latent_diffusion = user_command(_lazy("meddiff3d.pipelines.training", "train_latent_diffusion"))
distil_latent_diffusion = user_command(_lazy("meddiff3d.pipelines.distillation", "distil_latent_diffusion"))
train_autoencoder = user_command(_lazy("meddiff3d.pipelines.autoencoder_training", "train_autoencoder"))
synthetic_datalist = user_command(_lazy("meddiff3d.pipelines.data", "synthetic_datalist"))
calibrate_anomaly = user_command(_lazy("meddiff3d.pipelines.anomaly", "calibrate_anomaly"))
detect_anomalies = user_command(_lazy("meddiff3d.pipelines.anomaly", "detect_anomalies"))
evaluate_anomaly = user_command(_lazy("meddiff3d.evaluation.anomaly", "evaluate_anomaly"))
train_segmentation_diffusion = user_command(_lazy("meddiff3d.pipelines.seg_training", "train_segmentation_diffusion"))
segment = user_command(_lazy("meddiff3d.pipelines.segmentation", "segment"))
evaluate_segmentation = user_command(_lazy("meddiff3d.evaluation.segmentation", "evaluate_segmentation_dir"))
train_image_diffusion = user_command(_lazy("meddiff3d.pipelines.image_training", "train_image_diffusion"))
synthetic_slice_datalist = user_command(_lazy("meddiff3d.pipelines.data", "synthetic_slice_datalist"))
