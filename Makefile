# Two commands work on a fresh clone (see README):
#   make demo   runs the main job
#   make test   runs the whole test suite (CI runs this)
# Both create the virtual environment .venv on first use; `make test` also builds .venv-label (MONAI Label server
# tests, docs/slicer.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch, on disk on our machines; set TORCH_SPEC="torch" on GPU machines to take the registry's default build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv label-venv demo test test-fast test-label clean

# The suite runs in TEST_WORKERS pytest-xdist processes of one torch thread each (tests/conftest.py): most of its time
# is single-threaded (bundle commands at OMP_NUM_THREADS=1, reading and writing NIfTI), so two workers on 2 cores take
# about half the time of one. Each test module runs whole on one worker (loadscope: its module fixtures are built once,
# and the 10-12 GB first training steps of tests/test_bundle_readme_commands.py never run side by side); the modules
# go out in collected order, slow tests first. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder)

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[data,test]"
	touch $@

venv: $(VENV)/.installed

# MONAI Label (the 3D Slicer server, docs/slicer.md) pins numpy < 2 and an old DICOM stack, so it gets its own
# environment .venv-label: meddiff3d + monailabel + pytest there, never in .venv. LABEL_CONSTRAINTS also constrains
# the build environments of source distributions (sam2), so none of them pulls a CUDA build of torch.
LABEL_VENV := .venv-label
LABEL_PY := $(LABEL_VENV)/bin/python
LABEL_CONSTRAINTS := meddiff3d/label/constraints.txt
LABEL_PIP := $(LABEL_PY) -m pip install -c $(LABEL_CONSTRAINTS) --build-constraint $(LABEL_CONSTRAINTS)

$(LABEL_VENV)/.installed: setup.cfg pyproject.toml $(LABEL_CONSTRAINTS) meddiff3d/label/env.py
	rm -rf $(LABEL_VENV)
	$(PYTHON) -m venv $(LABEL_VENV)
	$(LABEL_PY) -m pip install --upgrade pip wheel setuptools
	$(LABEL_PIP) torch torchvision
	$(LABEL_PY) meddiff3d/label/env.py --requirements > $(LABEL_VENV)/requirements.txt
	PIP_CONSTRAINT=$(abspath $(LABEL_CONSTRAINTS)) $(LABEL_PIP) -r $(LABEL_VENV)/requirements.txt
	$(LABEL_PIP) --no-deps -e .
	$(LABEL_PY) meddiff3d/label/env.py --check
	touch $@

label-venv: $(LABEL_VENV)/.installed

# generate one 160x224x160 T1 brain MRI (NIfTI + PNG preview + JSON sidecar) from the shipped demo weights
demo: venv
	$(PY) -m monai.bundle run --config_file "['bundles/brain_mri_ldm/configs/common.yaml','bundles/brain_mri_ldm/configs/inference.yaml']" --bundle_root bundles/brain_mri_ldm --output_dir outputs/demo_brain_ldm

test: venv label-venv
	$(PY) -m pytest tests $(PARALLEL) --durations=30
	$(MAKE) test-label

# the MONAI Label server tests and docs/slicer.md's commands (run as printed) in their own environment;
# MEDDIFF3D_REQUIRE_LABEL=1 turns a missing MONAI Label into a failure (without it, these tests skip themselves, as
# in .venv)
test-label: label-venv
	MEDDIFF3D_REQUIRE_LABEL=1 $(LABEL_PY) -m pytest tests/test_label_server.py tests/test_label_units.py \
	    tests/test_label_doc_commands.py

test-fast: venv
	$(PY) -m pytest tests -m "not slow" $(PARALLEL)

clean:
	rm -rf $(VENV) $(LABEL_VENV) .pytest_cache outputs runs
