# Two commands for a newcomer on a fresh machine:
#   make quick   -> offline quick reproduction on the embedded digits data (tables + figures under reports/quick/)
#   make test    -> the test suite (the exact command CI runs)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
CORES   ?= all
TORCH   ?= torch==2.14.1 torchvision==0.29.1

.PHONY: quick test test-slurm lint env

# torch's CUDA build takes about 5.5 GB in the venv (6.0 GB in all; pip's temporary files stayed under
# 0.1 GB, measured 2026-11-27; the test extra's flwr[simulation] adds 0.33 GB): say so up front when the disk
# is short (CI once failed with "No space left on device" half-way through it), and keep pip's cache off the disk.
NEED_MB ?= 6900
PIP     := $(BIN)/pip install -q --no-cache-dir

# $(VENV)/.base: torch and the project (what `make quick` needs); $(VENV)/.full: plus the extras the tests
# use (pytest, hypothesis, ByzFL, Flower with Ray, the SLURM executor plugin). Each is a stamp file.
$(VENV)/.base: pyproject.toml
	@free=$$(df -Pm . | awk 'NR==2 {print $$4}'); \
	if [ -n "$$free" ] && [ "$$free" -lt $(NEED_MB) ]; then \
	  echo "WARNING: $$free MB free on the disk holding $(CURDIR); installing $(TORCH) needs about $(NEED_MB) MB" >&2; \
	fi
	$(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e .
	touch $@

$(VENV)/.full: $(VENV)/.base
	$(PIP) -e ".[test,slurm]"
	touch $@

env: $(VENV)/.full

# the quick study's 12 runs in one packed job (one process, clients of all runs trained together)
quick: $(VENV)/.base
	$(BIN)/snakemake --cores $(CORES) --config study=quick pack=12
	$(BIN)/snakemake --cores $(CORES) --config study=quick --report reports/quick/report.html

test: env
	$(BIN)/python -m pytest

# profiles/slurm for real (root): installs SLURM with apt-get, brings up a single-node cluster
# (tests/slurm/cluster.sh), runs the tiny study through the profile, shuts the cluster down
test-slurm: env
	ROBUSTFL_SLURM_TEST=1 $(BIN)/python -m pytest tests/test_slurm.py

lint: env
	$(BIN)/snakemake --lint
