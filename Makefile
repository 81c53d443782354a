# The README's quickstart: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use and install the committed lock (requirements/lock.txt: every
# package at the exact version the suite passed with, torch the CPU build) before the project,
# so a new release of any dependency cannot change what a fresh machine gets.
#
#   make test-latest   the suite against the newest releases pip resolves today (in .venv-latest)
#   make lock          test-latest, then write what it resolved into requirements/lock.txt
#   make setup TORCH=  keep the torch already in .venv (your own CUDA/ROCm build) instead of the lock's
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
STAMP := $(VENV)/.difflora-installed
LATEST := .venv-latest
TORCH ?= locked

.PHONY: test demo setup lint clean test-latest lock

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	grep -v '^torch==' $(LOCK) > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt pip setuptools wheel
	$(if $(TORCH),$(BIN)/python -m pip install --quiet "$$(grep '^torch==' $(LOCK))")
	$(BIN)/python -m pip install --quiet --no-build-isolation -c $(VENV)/constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests

demo: $(STAMP)
	$(BIN)/difflora demo --output_dir outputs/demo

lint: $(STAMP)
	$(BIN)/ruff check .

# Drift check: a fresh venv with the newest releases the bounds in pyproject.toml allow (torch
# stays the locked CPU build: a newer torch is a deliberate move, not drift). A failure here names
# the package that moved before a user's first run meets it.
test-latest: SHELL := /bin/bash
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install --quiet "$$(grep '^torch==' $(LOCK))"
	# torch stays at the lock's build: an eager upgrade would pull a multi-GB CUDA wheel on a CPU machine
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c <(grep '^torch==' $(LOCK)) -e '.[test]'
	@echo "packages that differ from the lock:"
	@$(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//' | sort \
		| comm -13 <(grep -v '^#' $(LOCK) | sort) - || true
	$(LATEST)/bin/python -m pytest tests

lock: SHELL := /bin/bash
lock: test-latest
	{ sed -n '1,3p' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "wrote $(LOCK); commit it"

clean:
	rm -rf $(VENV) $(LATEST) outputs
