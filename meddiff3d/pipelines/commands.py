"""Bundle entry points, with user errors turned into one line and exit status 2.

``python -m monai.bundle run`` wraps any exception of a config component in a chain of ``RuntimeError`` s ("Failed to
instantiate ..."), burying the message that matters. Two ways out, one rule: an :class:`~meddiff3d.errors.InputError`
anywhere in the chain is printed as ``error: <message>`` on stderr and the process exits with status 2; other errors
are bugs and keep their traceback.

- :func:`report_user_errors`, every bundle config's ``initialize``: for a ``run`` that drives the config's components
  (``$@evaluator.run()``), whose user errors surface while MONAI instantiates them. It installs a ``sys.excepthook``,
  so only an exception that ends the process is reported; a program that catches it (a server, a test, a
  ``ConfigWorkflow`` in a notebook) sees the exception unchanged.
- the wrapped pipeline functions below (:func:`user_command`), for ``run`` entries that are one recipe call (training,
  data generation); ``SystemExit`` is not an ``Exception``, so MONAI lets it through.
"""

from __future__ import annotations

import functools
import importlib
import sys
from typing import Any, Callable

from meddiff3d.errors import find_input_error

__all__ = ["report_user_errors", "user_command", "generate", "train_latent_diffusion", "train_autoencoder", "synthetic_datalist",
           "calibrate_anomaly", "detect_anomalies", "evaluate_anomaly", "train_segmentation_diffusion", "segment",
           "evaluate_segmentation"]


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
train_autoencoder = user_command(_lazy("meddiff3d.pipelines.autoencoder_training", "train_autoencoder"))
synthetic_datalist = user_command(_lazy("meddiff3d.pipelines.data", "synthetic_datalist"))
calibrate_anomaly = user_command(_lazy("meddiff3d.pipelines.anomaly", "calibrate_anomaly"))
detect_anomalies = user_command(_lazy("meddiff3d.pipelines.anomaly", "detect_anomalies"))
evaluate_anomaly = user_command(_lazy("meddiff3d.evaluation.anomaly", "evaluate_anomaly"))
train_segmentation_diffusion = user_command(_lazy("meddiff3d.pipelines.seg_training", "train_segmentation_diffusion"))
segment = user_command(_lazy("meddiff3d.pipelines.segmentation", "segment"))
evaluate_segmentation = user_command(_lazy("meddiff3d.evaluation.segmentation", "evaluate_segmentation_dir"))
