# Two commands for a newcomer on a fresh machine:
#   make quick   -> offline quick reproduction on the embedded digits data (tables + figures under reports/quick/)
#   make test    -> the test suite (the exact command CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CORES   ?= all
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: quick test full report lint env

$(BIN)/snakemake: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test,slurm]"
	touch $@

env: $(BIN)/snakemake

quick: env
	$(BIN)/snakemake --cores $(CORES) --set-threads run_cell=1 --config study=quick
	$(BIN)/snakemake --cores $(CORES) --config study=quick --report reports/quick/report.html

test: env
	$(BIN)/python -m pytest

lint: env
	$(BIN)/snakemake --lint
