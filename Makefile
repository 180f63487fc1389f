# Two commands work on a fresh clone (see README):
#   make demo   runs the main job
#   make test   runs the whole test suite (CI runs this)
# Both create the virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build of torch, on disk on our machines; set TORCH_SPEC="torch" on GPU machines to take the registry's default build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip wheel
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[data,test]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m meddiff3d synth healthy --n 2 --out outputs/demo_healthy --seed 0

test: venv
	$(PY) -m pytest tests

test-fast: venv
	$(PY) -m pytest tests -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache outputs runs
