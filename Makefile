# From a fresh clone, two commands do all the set-up:
#   make run    the daemon with the shipped config.yaml (in its own terminal; Ctrl-C stops it)
#   make test   the test suite (what CI runs)
# Both create the virtual environment in .venv first when it is missing (or older than pyproject.toml).

PYTHON ?= python3
VENV := .venv
CONFIG ?= config.yaml

.PHONY: run test

run: $(VENV)/bin/retraind
	$(VENV)/bin/retraind run --config $(CONFIG)

test: $(VENV)/bin/retraind
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider

$(VENV)/bin/retraind: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@
