# The two commands of the README: `make demo` runs the quickstart, `make test` the suite.
# Both create .venv and install fedtide into it first.
VENV := .venv
PY := $(VENV)/bin/python
# pip takes torch 2.14.1 (CUDA build, ~5 GB) from this machine's disk; elsewhere it downloads it.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install

$(VENV)/.installed: pyproject.toml examples/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# PYTHONWARNINGS: setuptools' editable-install banner (a warning of its build backend) stays quiet
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e '.[test]'
	# the example plugins, registered under fedtide's entry-point groups (the tests use them)
	PYTHONWARNINGS=ignore $(PY) -m pip install -q -e examples
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fedtide run scenarios/quickstart.yaml

# Two pytest workers, one per core: a test file runs whole on one of them (its module fixtures run once),
# and each worker starts Ray in a folder of its own (tests/conftest.py).
test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
