"""The shell commands printed in the project's markdown files, as a reader would copy them: every line of every
```bash block, continuation lines (ending in a backslash) joined, comments after `  # ` dropped, blank lines skipped.
The doc-command tests run these texts as printed (``bundle_testing.run_as_printed``) and check that none is left
out."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def markdown_files() -> list[Path]:
    """Every markdown file a reader follows: the README, docs/, each bundle's docs/ (not the models' notes)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(ROOT.glob("bundles/*/docs/*.md"))]
    return [f for f in files if f.is_file()]


def commands(path: Path) -> list[str]:
    """The commands of the ```bash blocks of ``path``, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", Path(path).read_text(), re.S):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"(^|\s{2,})#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            line = (pending + line.strip()).strip()
            pending = ""
            if line:
                out.append(line)
    return out


#: what a fresh clone gives a reader who ran `make venv` / `make label-venv`, as seen from a scratch folder: these
#: are linked (read-only for the commands: environments, scripts, build files, the package); a test whose commands
#: name ``bundles/...`` copies the bundles (``copy=("bundles",)``), so that nothing is written into the repository
LINKED = (".venv", ".venv-label", "scripts", "Makefile", "setup.cfg", "pyproject.toml", "meddiff3d")


def user_folder(path: Path, *, link: tuple[str, ...] = LINKED, copy: tuple[str, ...] = ()) -> Path:
    """``path`` made to look like the reader's clone for the doc commands: ``link`` entries of ROOT symlinked,
    ``copy`` entries copied (only those that exist in ROOT)."""
    import shutil

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in link:
        if (ROOT / name).exists():
            (path / name).symlink_to(ROOT / name)
    for name in copy:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, path / name, ignore=shutil.ignore_patterns("__pycache__", "outputs"))
    return path


def label_commands() -> list[str]:
    """The commands of docs/slicer.md that tests/test_label_doc_commands.py runs in the label environment: all but
    building the environment, which `make test` does."""
    return [c for c in commands(ROOT / "docs" / "slicer.md") if c != "make label-venv"]


#: the datasets the doc commands' ``$DATA`` holds in the tests, small but laid out as the real ones (BraTS 2021
#: names, a folder of T1 files, a covariates CSV), written by scripts/make_own_data_example.py's functions
SMALL_BRATS = {"shape": (40, 56, 40), "source": "procedural"}  # 4 mm over the 160x224x160 mm field of view
SMALL_T1 = {"shape": (80, 112, 80), "source": "procedural"}  # 2 mm
T1_COVARIATES = {"sub-01_T1w": (52, "female"), "sub-02_T1w": (67, "male"), "sub-03_T1w": (81, "female")}


def user_datasets(path: Path, *, t1: bool = True) -> Path:
    """``path`` (the docs' ``DATA``) holding ``BraTS2021_Training_Data/`` (4 BraTS-named cases) and, with ``t1``,
    ``my_t1s/`` (3 T1 files, one stored LPS) and ``my_t1s_covariates.csv`` (id, age in years, sex)."""
    from bundle_testing import script_module

    example = script_module("make_own_data_example")
    path = Path(path)
    example.write_brats_cases(path / "BraTS2021_Training_Data", 4, 0, **SMALL_BRATS)
    if t1:
        example.write_t1_files(path / "my_t1s", "healthy", len(T1_COVARIATES), 1, "sub", lps_every=2, **SMALL_T1)
        rows = [f"{i},{age},{sex}" for i, (age, sex) in T1_COVARIATES.items()]
        (path / "my_t1s_covariates.csv").write_text("\n".join(["id,age,sex", *rows]) + "\n")
    return path
