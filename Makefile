# Two entry points: `make demo` (the whole study on the built-in digits data) and `make test`.
# Both create .venv from requirements.txt the first time.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

demo: $(VENV)/.installed
	PYTHON=$(abspath $(PY)) bash demo.sh

.PHONY: venv test demo
