"""Every command of the repository's own markdown files (README.md, docs/data.md, docs/slicer.md, docs/own_data.md)
runs as printed (issue 18).

A command of a ```bash block (tests/doc_commands.py reads them) is run by exactly one test, by its text, unchanged,
with bash (``bundle_testing.run_as_printed``), in a scratch folder laid out as the reader's clone
(tests/doc_commands.py ``user_folder``: the environments, scripts and build files linked, the bundles copied where a
command names them), ``DATA`` set to a folder of small datasets laid out as the real ones (``user_datasets``). Which
test runs which commands is the table ``runners()``; the fast test below fails when a doc gains a command no test
runs. A command no test can run here would go into ``EXEMPT`` with a physical reason (hardware this machine lacks, a
download from a hub); none of these four files needs one.

The bundle READMEs (bundles/*/docs/README.md) have their own tests (tests/test_bundle_*.py).
"""

from __future__ import annotations

import json
import re
import time

import nibabel as nib
import numpy as np
import pytest
from bundle_testing import run_as_printed
from doc_commands import ROOT, T1_COVARIATES, commands, label_commands, user_datasets, user_folder
from test_own_data_guide import guide_commands
from test_readme_commands import readme_commands

DOCS = ("README.md", "docs/data.md", "docs/slicer.md", "docs/own_data.md")
#: command -> why it cannot run in a test here (physical reasons only); empty: every command of DOCS runs
EXEMPT: dict[str, str] = {}
#: command -> where CI runs it
RUN_BY_CI = {
    "make test": "CI runs it: .ci/run is `make test`",
    "make label-venv": "CI builds it: `make test` depends on label-venv",
}
#: placeholders a reader cannot run
PLACEHOLDER = re.compile(r"/path/to|(^|[\s=])/data/|\[--|\.\.\.|\b[A-Z]{3,}_(DIR|FILE|PATH)\b")
DATA_PROSE = re.compile(r"`DATA` (is|being) the folder of your datasets")


def doc(name: str) -> list[str]:
    return commands(ROOT / name)


def cli_commands() -> list[str]:
    """README's `synth` and `datalist` lines, then docs/data.md's commands, in reading order, each once: the
    conversions and validations of docs/data.md use the README's synthetic cohorts."""
    readme = [c for c in doc("README.md") if re.match(r"\.venv/bin/python -m meddiff3d (synth|datalist) ", c)]
    return list(dict.fromkeys(readme + doc("docs/data.md")))


def bundle_run_commands() -> list[str]:
    """README's `python -m monai.bundle run` lines (generation with the demo weights)."""
    return [c for c in doc("README.md") if c.startswith(".venv/bin/python -m monai.bundle run ")]


def runners() -> dict[str, list[str]]:
    """test (or CI) -> the commands it runs as printed."""
    return {
        "tests/test_doc_commands.py::test_cli_commands_run_as_printed": cli_commands(),
        "tests/test_doc_commands.py::test_bundle_run_command_runs_as_printed": bundle_run_commands(),
        "tests/test_readme_commands.py::test_main_command_runs": [readme_commands()[0]],
        "tests/test_own_data_guide.py::test_the_guide_runs_as_printed": guide_commands(),
        "tests/test_label_doc_commands.py (make test-label)": label_commands(),
        **{f"CI ({why})": [command] for command, why in RUN_BY_CI.items()},
    }


# ------------------------------------------------------------------------------------------------------- coverage
def test_every_command_is_run_by_exactly_one_test_or_exempt():
    owners: dict[str, list[str]] = {}
    for runner, cmds in runners().items():
        for command in dict.fromkeys(cmds):
            owners.setdefault(command, []).append(runner)
    for command, reason in EXEMPT.items():
        owners.setdefault(command, []).append(f"exempt: {reason}")
    in_docs = {c for name in DOCS for c in doc(name)}
    problems = [f"{name}: {c!r} -> {owners.get(c) or 'no test runs it (add it to a runner, or EXEMPT)'}"
                for name in DOCS for c in doc(name) if len(owners.get(c, [])) != 1]
    problems += [f"{c!r} is not a command of {DOCS} any more ({who})" for c, who in owners.items() if c not in in_docs]
    assert not problems, "\n".join(problems)
    assert readme_commands()[0] == "make demo"


def test_the_ci_claims_hold():
    """`make test` is CI's command, and it builds the label environment and runs the label-env doc test."""
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\blabel-venv\b", makefile, re.M)
    assert re.search(r"^test-label: .*\n(\t.*\n)*\t.*tests/test_label_doc_commands\.py", makefile, re.M)
    assert re.search(r"^test:.*\n(\t.*\n)*\t\$\(MAKE\) test-label", makefile, re.M)


def test_no_placeholders_and_data_is_introduced():
    for name in DOCS:
        text = (ROOT / name).read_text()
        for command in doc(name):
            assert not PLACEHOLDER.search(command), (name, command)
        if any("$DATA" in c for c in doc(name)):
            assert DATA_PROSE.search(text), f"{name} uses $DATA without saying what it is"



def test_docs_and_configs_read_in_an_ascii_locale():
    """Markdown, configs and JSON read with the locale's encoding (``Path.read_text()`` in the tests, MONAI's own
    readers, a user's ``cat``): CI's locale is ASCII, so these files stay ASCII (``+/-``, not the plus-minus sign)."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    texts = [n for n in tracked if n.endswith((".md", ".yaml", ".yml", ".json", ".cfg", ".txt", ".ini"))]
    assert "README.md" in texts and any(n.startswith("bundles/") for n in texts)
    for name in texts:
        data = (ROOT / name).read_bytes()
        bad = next((i for i, b in enumerate(data) if b > 127), None)
        assert bad is None, f"{name}: non-ASCII byte at offset {bad}: {data[max(0, bad - 20):bad + 20]!r}"

# ------------------------------------------------------------------------------------------------------ execution
def nifti(path, shape, zooms):
    img = nib.load(path)
    assert img.shape == tuple(shape), (path, img.shape)
    np.testing.assert_allclose(img.header.get_zooms()[:3], zooms)
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S"), path
    data = np.asarray(img.dataobj)
    assert np.isfinite(data).all() and data.std() > 0, path
    return img


def items(datalist):
    doc_ = json.loads(datalist.read_text())
    return doc_, {s: doc_.get(s, []) for s in ("training", "validation", "test")}


def run_all(cmds, clone, env):
    times, outputs = {}, {}
    for command in cmds:
        start = time.perf_counter()
        result = run_as_printed(command, clone, **env)
        times[command] = round(time.perf_counter() - start, 1)
        assert result.returncode == 0, (command, result.stderr[-3000:])
        outputs[command] = result.stdout
    print("\ndoc command times (s):", json.dumps(times, indent=1))
    return outputs


@pytest.mark.slow
def test_cli_commands_run_as_printed(tmp_path):
    data = user_datasets(tmp_path / "datasets")
    clone = user_folder(tmp_path / "clone")
    outputs = run_all(cli_commands(), clone, {"DATA": str(data)})

    d = clone / "data"
    for kind, modalities in (("healthy", 1), ("brats", 4), ("anomaly", 1)):  # README: synth --n 4
        meta, sections = items(d / kind / "datalist.json")
        every = [i for s in sections.values() for i in s]
        assert len(every) == 4 and meta["synthetic"]["shape"] == [160, 224, 160], kind
        first = every[0]["image"]
        assert len(first if isinstance(first, list) else [first]) == modalities
        nifti(d / kind / (first[0] if isinstance(first, list) else first), (160, 224, 160), (1, 1, 1))
    assert all("label" in i for s in items(d / "brats" / "datalist.json")[1].values() for i in s)
    assert all("label" in i for i in items(d / "anomaly" / "datalist.json")[1]["test"])
    meta, sections = items(d / "anomaly_ood" / "datalist.json")  # docs/data.md: the out-of-template test set
    assert [i["variant"] for i in sections["test"]] == ["asymmetric", "contrast", "phantom"] * 2
    assert meta["synthetic"]["variant"] == "out_of_template" and all("label" in i for i in sections["test"])
    validations = [out for c, out in outputs.items() if " datalist validate " in c]
    assert len(validations) == 2 and all(": OK" in out for out in validations)
    assert "training: 3 items, 3 with label" in validations[-1]

    cases = sorted(p.name for p in (data / "BraTS2021_Training_Data").iterdir())
    meta, sections = items(d / "brats_real" / "datalist.json")
    assert sorted(i["id"] for s in sections.values() for i in s) == cases and meta["label_convention"] == "brats2021"
    assert len(sections["training"]) == 3  # 80/10/10 of 4 cases
    for item in (i for s in sections.values() for i in s):
        assert all(str(data) in p for p in [*item["image"], item["label"]])
        assert [p.rsplit("_", 1)[1] for p in item["image"]] == ["t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz", "flair.nii.gz"]
    _, sections = items(d / "brats_real" / "all_test.json")  # --fractions 0 0 1
    assert sorted(i["id"] for i in sections["test"]) == cases and not sections["training"] + sections["validation"]

    grids = {"t1_cohort": ((160, 224, 160), (1, 1, 1)), "t1_cohort_cov": ((160, 224, 160), (1, 1, 1)),
             "t1_cohort_2mm": ((80, 112, 80), (2, 2, 2))}
    for folder, (shape, zooms) in grids.items():
        _, sections = items(d / folder / "datalist.json")
        every = [i for s in sections.values() for i in s]
        assert sorted(i["id"] for i in every) == sorted(T1_COVARIATES), folder
        for item in every:
            nifti(d / folder / item["image"], shape, zooms)
    meta, sections = items(d / "t1_cohort_cov" / "datalist.json")  # scaled by data/healthy's ranges: age 40-90 y
    for item in (i for s in sections.values() for i in s):
        age, sex = T1_COVARIATES[item["id"]]
        assert item["covariates"] == pytest.approx({"age": (age - 40) / 50, "sex": float(sex == "male")})
    assert meta["covariates"]["age"]["min"] == 40 and meta["covariates"]["sex"]["categories"] == ["female", "male"]


@pytest.mark.slow
def test_bundle_run_command_runs_as_printed(tmp_path):
    (command,) = bundle_run_commands()
    clone = user_folder(tmp_path / "clone", copy=("bundles",))
    bundle_files = sorted(p.relative_to(clone) for p in (clone / "bundles").rglob("*"))
    run_all([command], clone, {})
    out = clone / "outputs" / "old"
    samples = []
    for seed in (0, 1):  # --num_samples 2
        img = nifti(out / f"sample_seed{seed}.nii.gz", (160, 224, 160), (1, 1, 1))
        assert img.get_data_dtype() == np.float32 and (out / f"sample_seed{seed}.png").is_file()
        sidecar = json.loads((out / f"sample_seed{seed}.json").read_text())
        assert (sidecar["sampler"], sidecar["steps"], sidecar["guidance_scale"]) == ("dpmpp_2m", 20, 2.0)
        assert sidecar["covariates"]["age"] == pytest.approx(0.9) and sidecar["seed"] == seed
        samples.append(np.asarray(img.dataobj))
    assert np.abs(samples[0] - samples[1]).mean() > 1e-3
    assert sorted(p.relative_to(clone) for p in (clone / "bundles").rglob("*")) == bundle_files  # nothing written there
