"""What every task command shares: find the bundle, turn plain inputs into what its config reads, run the config.

A task command runs one config of one bundle (``configs/inference.yaml``, or ``configs/calibrate.yaml``; merged after
``configs/common.yaml`` when the bundle has one, as its README does) through MONAI's ``ConfigWorkflow``, with
``bundle_root`` = the bundle folder and the command's flags as config overrides: exactly what
``python -m monai.bundle run --config_file "['configs/common.yaml','configs/inference.yaml']" --key value ...`` runs,
the same components, checks and errors. A user error anywhere (an :class:`~meddiff3d.errors.InputError`, also when
MONAI wraps it) propagates to :func:`meddiff3d.cli.main`: one ``error:`` line, exit status 2.

- :func:`find_bundle`: ``--bundle`` (a folder, or the name of a shipped bundle) or, by default, the bundle of the task
  that ships with the package (``bundles/<name>`` beside the installed ``meddiff3d`` package: an editable install or
  a clone). A bundle's kind is the ``evaluator`` its ``configs/inference.yaml`` runs
  (:data:`meddiff3d.label.bundles.KINDS`, the table the MONAI Label server uses too).
- :func:`datalist_input`: ``-i`` as the config's ``datalist``: a datalist JSON as given, a folder as a datalist made
  in a :func:`scratch` folder (removed after the run), with :func:`named_as` putting the user's ``-i`` back into
  the messages that name it. :func:`t1_inputs`: the T1 volumes of a folder (one DICOM series folder is one volume).
- Outputs go where ``-o`` says, by default ``./outputs/<task>`` under the current folder (:func:`default_output`),
  never into the bundle.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from meddiff3d.errors import InputError, find_input_error

__all__ = ["SHIPPED", "shipped_bundle", "find_bundle", "bundle_kind", "add_bundle_arguments", "epilog", "common_overrides",
           "default_output", "absolute", "input_path", "no_section_for", "t1_inputs", "scratch",
           "named_as", "datalist_input", "run_bundle", "setup_logging"]

#: bundle kind -> the folder of the shipped bundle under ``bundles/``
SHIPPED = {"generation": "brain_mri_ldm", "segmentation": "brats_mri_segdiff", "anomaly": "brain_mri_anomaly_ldm"}


def shipped_bundle(kind: str) -> Path | None:
    """The shipped bundle of ``kind`` (``bundles/<name>`` beside the installed package), ``None`` if not there (a
    wheel install: the bundles are not part of the package)."""
    import meddiff3d

    root = Path(meddiff3d.__file__).resolve().parent.parent / "bundles" / SHIPPED[kind]
    return root if (root / "configs" / "inference.yaml").is_file() else None


def bundle_kind(root: Path) -> str:
    """``generation`` / ``segmentation`` / ``anomaly``: the kind of the ``evaluator`` of ``root``'s inference config
    (merged after ``configs/common.yaml``); raises :class:`InputError` for any other evaluator."""
    from monai.bundle import ConfigParser

    from meddiff3d.label.bundles import KINDS

    files = [root / "configs" / name for name in ("common.yaml", "inference.yaml")]
    try:
        config = ConfigParser.load_config_files([str(f) for f in files if f.is_file()])
    except Exception as err:  # noqa: BLE001 - a broken YAML/JSON file of the user's bundle
        raise InputError(f"bundle {root}: cannot read its configs ({err})") from None
    evaluator = config.get("evaluator")
    target = evaluator.get("_target_") if isinstance(evaluator, Mapping) else None
    kind = KINDS.get(str(target))
    if kind is None:
        raise InputError(f"bundle {root}: its configs/inference.yaml runs the evaluator {target!r}, none of the "
                         f"meddiff3d evaluators ({', '.join(KINDS)})")
    return kind


def find_bundle(given: str | None, kind: str, command: str) -> Path:
    """The bundle folder ``command`` runs: ``given`` (``--bundle``: a folder, or a shipped bundle's name) or the
    shipped bundle of ``kind``; it must hold ``configs/inference.yaml`` whose evaluator is of ``kind``."""
    if given is None:
        root = shipped_bundle(kind)
        if root is None:
            raise InputError(f"meddiff3d {command}: the {SHIPPED[kind]} bundle is not beside the installed package "
                             f"(an install from a wheel); give its folder with --bundle")
        return root
    root = Path(given).expanduser()
    if not root.exists() and given in SHIPPED.values() and shipped_bundle(_kind_of_name(given)) is not None:
        root = shipped_bundle(_kind_of_name(given))  # type: ignore[assignment]
    if not root.is_dir():
        raise InputError(f"--bundle {given}: no such bundle folder (give a folder holding configs/inference.yaml, "
                         f"or a shipped bundle's name: {', '.join(SHIPPED.values())})")
    root = root.absolute()
    if not (root / "configs" / "inference.yaml").is_file():
        raise InputError(f"--bundle {root} is not a bundle folder: it has no configs/inference.yaml")
    found = bundle_kind(root)
    if found != kind:
        raise InputError(f"--bundle {root} is a {found} bundle; meddiff3d {command} runs "
                         f"{'an' if kind == 'anomaly' else 'a'} {kind} bundle (e.g. {SHIPPED[kind]})")
    return root


def _kind_of_name(name: str) -> str:
    return next(kind for kind, folder in SHIPPED.items() if folder == name)


def add_bundle_arguments(parser: argparse.ArgumentParser, kind: str, doc: str) -> None:
    """``--bundle``, ``--device``, ``--amp`` (every task command has them) and the flag table of ``doc`` as the
    epilog of ``--help``."""
    parser.add_argument("--bundle", metavar="B", help=f"bundle folder (or a shipped bundle's name); default: the "
                        f"shipped {SHIPPED[kind]}")
    parser.add_argument("--device", metavar="D", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), help="mixed precision (default auto)")
    parser.epilog = epilog(doc)


def epilog(doc: str) -> str:
    """The part of a task module's docstring from its flag table on (the table is written once, there)."""
    lines = doc.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("flag "))
    return "\n".join(lines[start:])


def common_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--device`` -> ``device`` (a torch.device, as the bundles' configs make it), ``--amp`` -> ``amp``."""
    overrides: dict[str, Any] = {}
    if args.device is not None:
        overrides["device"] = {"_target_": "meddiff3d.engine.precision.resolve_device", "device": args.device}
    if args.amp is not None:
        overrides["amp"] = args.amp
    return overrides


def default_output(task: str) -> Path:
    """``./outputs/<task>`` under the current folder."""
    return Path.cwd() / "outputs" / task


def absolute(path: str | Path) -> str:
    """``path`` made absolute against the current folder (the bundle config reads it with another ``bundle_root``),
    as a string MONAI's parser never takes for a reference (an absolute path starts with neither ``@`` nor ``$``)."""
    return str(Path(path).expanduser().absolute())


def input_path(given: str, flag: str = "-i") -> Path:
    """An input (``-i``, or ``flag``): an existing file or folder, absolute."""
    path = Path(given).expanduser()
    if not path.exists():
        raise InputError(f"{flag} {given}: no such file or folder")
    return path.absolute()


def no_section_for(section: str | None, src: Path) -> None:
    """``--section`` picks a section of a datalist: refused when ``-i`` is a folder or an image file."""
    if section is not None:
        raise InputError(f"--section picks a section of a datalist; -i {src} is not one (a folder or an image file "
                         f"is used whole)")


def t1_inputs(folder: Path) -> dict[str, str]:
    """``{id: absolute path}`` of the T1 volumes of ``folder``, found as ``meddiff3d datalist t1`` finds them
    (:func:`~meddiff3d.data.t1_conversion.find_t1_inputs`): the folder itself when it is one DICOM series (id = its
    name), else the image files and DICOM series sub-folders directly in it (id = the name without suffix)."""
    from meddiff3d.data.t1_conversion import find_t1_inputs

    return {case: absolute(path) for case, path in find_t1_inputs(folder).items()}


@contextlib.contextmanager
def scratch(command: str) -> Iterator[Path]:
    """A temporary folder for the run's own files (a datalist made from a folder), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"meddiff3d-{command}-") as folder:
        yield Path(folder)


class _Rename(logging.Filter):
    """A log handler's filter: ``old`` forms in a message become ``new``."""

    def __init__(self, old: set[str], new: str) -> None:
        super().__init__()
        self.old, self.new = old, new

    def rename(self, text: str) -> str:
        for form in self.old:
            text = text.replace(form, self.new)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(form in message for form in self.old):
            record.msg, record.args = self.rename(message), ()
        return True


@contextlib.contextmanager
def named_as(scratch_file: Path, name: str) -> Iterator[None]:
    """Messages naming ``scratch_file`` (a datalist the command made) name ``name`` instead: a user error raised in
    the block, and the log lines of the bundle meanwhile (which sections, how many cases)."""
    rename = _Rename({str(scratch_file), str(scratch_file.resolve())}, name)
    handlers = logging.getLogger().handlers
    for handler in handlers:
        handler.addFilter(rename)
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only user errors are renamed; the rest passes unchanged
        user = find_input_error(err)
        if user is None or rename.rename(str(user)) == str(user):
            raise
        raise type(user)(rename.rename(str(user))) from None
    finally:
        for handler in handlers:
            handler.removeFilter(rename)


@contextlib.contextmanager
def datalist_input(command: str, src: Path, section: str | None, make: Callable[[Path, Path], str], expected: str,
                   section_key: str = "section") -> Iterator[dict[str, Any]]:
    """The config keys ``datalist`` and ``section_key`` for ``-i src``, valid inside the block.

    A datalist JSON is used as given (``--section`` -> ``section_key``, unset: the config's own). A folder becomes a
    temporary datalist: ``make(src, path)`` writes it at ``path`` and returns the section holding its items
    (``--section`` is refused, the folder is used whole); messages naming it name ``-i`` instead
    (:func:`named_as`), and it is removed after the block. Anything else: an :class:`InputError` saying ``-i``
    should be ``expected``."""
    if src.is_dir():
        no_section_for(section, src)
        with scratch(command) as tmp:
            made = tmp / "datalist.json"
            with named_as(made, f"made from -i {src}"):
                made_section = make(src, made)
                yield {"datalist": str(made), section_key: made_section}
        return
    if not src.name.lower().endswith(".json"):
        raise InputError(f"-i {src}: expected {expected}")
    yield {"datalist": absolute(src), **({section_key: section} if section is not None else {})}


def run_bundle(root: Path, config: str, overrides: Mapping[str, Any], prepare=None) -> Any:
    """Run ``configs/<config>`` of the bundle ``root`` (after ``configs/common.yaml`` when there) with ``overrides``;
    returns what its ``run`` returns (the evaluator's result). ``prepare(parser)`` may change the merged config
    before it is parsed (e.g. merge a partial ``covariates`` into the config's own)."""
    from monai.bundle import ConfigWorkflow

    files = [root / "configs" / name for name in ("common.yaml", config)]
    if not files[1].is_file():
        raise InputError(f"bundle {root} has no configs/{config}")
    monai_log = logging.getLogger("monai.bundle.workflows")
    level = monai_log.level
    monai_log.setLevel(logging.ERROR)  # not "Logging file is set to False": the command sets up its own logging
    try:
        workflow = ConfigWorkflow(config_file=[str(f) for f in files if f.is_file()], logging_file=False,
                                  workflow_type="infer" if config == "inference.yaml" else None,
                                  bundle_root=str(root), **dict(overrides))
    finally:
        monai_log.setLevel(level)
    if prepare is not None:
        prepare(workflow.parser)
    workflow.initialize()
    results = workflow.run()
    workflow.finalize()
    return results[0] if len(results) == 1 else results


def setup_logging() -> None:
    """The bundles' progress lines (which sections, how many cases) on stderr, as ``meddiff3d datalist`` shows its."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
