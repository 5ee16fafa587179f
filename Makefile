# The README's two set-up commands. Both work on a fresh clone: they create .venv unless a virtual
# environment is already active, install torch first (the pinned release: the CPU wheel on a
# machine without a GPU), then dspark, then run the job.
SHELL := /bin/bash
VENV ?= .venv
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(VENV)/bin/python
endif
TORCH := torch==2.13.0
PIP := $(PY) -m pip install --disable-pip-version-check -q

.PHONY: demo test install install-dev

$(PY):
	python3 -m venv $(VENV)

# A stamp per extra set, redone when pyproject.toml changes.
$(VENV)/.stamp-base: pyproject.toml | $(PY)
	$(PIP) $(TORCH)
	$(PIP) $(TORCH) -e ".[grammar,serve,cpu-quant]"
	@mkdir -p $(VENV) && touch $@

$(VENV)/.stamp-dev: pyproject.toml | $(PY)
	$(PIP) $(TORCH)
	$(PIP) $(TORCH) -e ".[dev]"
	@mkdir -p $(VENV) && touch $@

install: $(VENV)/.stamp-base
install-dev: $(VENV)/.stamp-dev

demo: install
	$(PY) -m dspark quickstart

test: install-dev
	$(PY) -m pytest --durations=15
