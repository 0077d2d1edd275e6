"""Shared fixtures: a single gloo CPU rank inside the test process for single-process model tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")
# The suite runs every rank on the CPU (gloo), also on a machine with a GPU: the default of parallel.device.
os.environ.setdefault("MEGATRON_QWEN_DEVICE", "cpu")


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core initialised for one CPU rank (TP=PP=1) in this process, with the CPU harness."""
    from spawn import free_port

    from megatron_qwen.platform.launch import init_distributed

    # Only for the init: tests that launch jobs (torchrun, sbatch) pass this process's environment on,
    # and a MASTER_PORT held by this process's store would collide with theirs.
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        init_distributed(1, 1, None, device="cpu")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield
