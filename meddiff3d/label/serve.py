"""``meddiff3d label serve``: start MONAI Label (offline) serving meddiff3d bundles to 3D Slicer.

    meddiff3d label serve --studies DIR [--port 8000] [--host 127.0.0.1] [--bundles brats_mri_segdiff ...]
                          [--timeout 600] [--app-dir DIR] [--dry-run]

It writes an app folder (``main.py`` importing :class:`meddiff3d.label.app.MedDiff3DApp`, and ``model/<name>``
symlinks to the bundle folders), then replaces itself by::

    <label python> -m monailabel.main start_server --app APP --studies DIR --host H --port P
        --uvicorn_app meddiff3d.label.server:app --conf models <names> --conf request_timeout <seconds>
        --conf zoo_source github --conf sam2 false --conf skip_trainers true

(``meddiff3d.label.server:app`` is MONAI Label's web app with meddiff3d's infer endpoint, see that module.)

MONAI Label comes from the label environment (``make label-venv``): this python if it can import MONAI Label, else
``<repository>/.venv-label/bin/python``. ``--bundles`` takes bundle names of the repository's ``bundles/``
folder or paths (``name=path`` to serve a folder under another name); default: the three bundles.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from meddiff3d.checks import check_number
from meddiff3d.errors import InputError
from meddiff3d.label.request import DEFAULT_TIMEOUT_S

__all__ = ["add_arguments", "run", "prepare_app", "monailabel_command", "find_label_python", "DEFAULT_BUNDLES",
           "UVICORN_APP"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_BUNDLES = ("brats_mri_segdiff", "brain_mri_anomaly_ldm", "brain_mri_ldm")
#: MONAI Label options that keep the server offline (no model-zoo call, no SAM2 weight download, no trainers)
OFFLINE_CONF = (("zoo_source", "github"), ("sam2", "false"), ("skip_trainers", "true"))
#: the web app uvicorn serves: MONAI Label's, with meddiff3d's infer endpoint (meddiff3d/label/server.py)
UVICORN_APP = "meddiff3d.label.server:app"
MAIN_PY = '''"""Written by `meddiff3d label serve`: MONAI Label loads the app class from this file."""
from meddiff3d.label.app import MedDiff3DApp  # noqa: F401
'''


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="label_command", required=True)
    serve = sub.add_parser("serve", help="start the MONAI Label server (3D Slicer's MONAI Label module connects to it)",
                           description="start MONAI Label (offline) serving meddiff3d bundles to 3D Slicer")
    serve.add_argument("--studies", type=Path, required=True,
                       help="datastore folder of images (flat; BraTS cases as <case>_t1/_t1ce/_t2/_flair.nii.gz)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (default: this one)")
    serve.add_argument("--bundles", nargs="+", default=list(DEFAULT_BUNDLES),
                       help="bundle names in bundles/, folders, or name=folder (default: all three)")
    serve.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                       help=f"seconds one request may compute before it is stopped with HTTP 504 (default "
                            f"{DEFAULT_TIMEOUT_S:g}; 0: no limit)")
    serve.add_argument("--app-dir", type=Path, default=None,
                       help="app folder to write (default: ~/.cache/meddiff3d/label-app-<port>)")
    serve.add_argument("--python", default=None,
                       help="python of the MONAI Label environment (default: this one if it has MONAI Label, else "
                            ".venv-label/bin/python)")
    serve.add_argument("--dry-run", action="store_true", help="prepare the app folder and print the command only")


def _bundle_folders(specs: list[str]) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        folder = Path(path).expanduser()
        if not folder.is_dir() and (REPO / "bundles" / path).is_dir():
            folder = REPO / "bundles" / path
        if not (folder / "configs" / "inference.yaml").is_file():
            raise InputError(f"--bundles {spec}: {folder} is not a bundle folder (no configs/inference.yaml)")
        name = name or folder.resolve().name
        if name in folders:
            raise InputError(f"--bundles: the name {name!r} is given twice")
        folders[name] = folder.resolve()
    return folders


def prepare_app(app_dir: Path, bundles: dict[str, Path]) -> Path:
    """Write ``app_dir/main.py`` and the ``app_dir/model/<name>`` symlinks (stale links are replaced)."""
    model_dir = app_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "main.py").write_text(MAIN_PY)
    for name, folder in bundles.items():
        link = model_dir / name
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(folder, target_is_directory=True)
    return app_dir


def find_label_python(explicit: str | None = None) -> str:
    """The python of an environment with MONAI Label: ``explicit``, this one, or ``<repository>/.venv-label``."""
    import importlib.util

    if explicit:
        candidates = [explicit]
    elif importlib.util.find_spec("monailabel") is not None:
        return sys.executable
    else:
        candidates = [str(REPO / ".venv-label" / "bin" / "python")]
    for candidate in candidates:
        if Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise InputError(f"MONAI Label not found (not importable here, no {', '.join(candidates)}): build its environment "
                     f"with `make label-venv` (docs/slicer.md)")


def monailabel_command(python: str, app_dir: Path, studies: Path, host: str, port: int,
                       names: list[str], timeout: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """``python -m monailabel.main start_server ...`` (the ``monailabel`` script does the same with the ``python``
    first on PATH, which need not be the label environment's)."""
    cmd = [python, "-m", "monailabel.main", "start_server", "--app", str(app_dir), "--studies", str(studies),
           "--host", host, "--port", str(port), "--uvicorn_app", UVICORN_APP, "--conf", "models", ",".join(names),
           "--conf", "request_timeout", f"{timeout:g}"]
    for key, value in OFFLINE_CONF:
        cmd += ["--conf", key, value]
    return cmd


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be in 1..65535, got {args.port}")
    check_number("--timeout", args.timeout, 0.0)
    studies = args.studies.expanduser().absolute()
    if not studies.is_dir():
        raise InputError(f"--studies {studies}: no such folder")
    bundles = _bundle_folders(args.bundles)
    app_dir = (args.app_dir or Path.home() / ".cache" / "meddiff3d" / f"label-app-{args.port}").expanduser().absolute()
    prepare_app(app_dir, bundles)
    python = find_label_python(args.python) if not args.dry_run else (args.python or sys.executable)
    cmd = monailabel_command(python, app_dir, studies, args.host, args.port, list(bundles), args.timeout)
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = dict(os.environ, MONAI_LABEL_AUTO_UPDATE_SCORING="false", MONAI_LABEL_TASKS_TRAIN="false")
    os.execve(python, cmd, env)  # the server replaces this process (signals reach it directly)
    return 0  # not reached
