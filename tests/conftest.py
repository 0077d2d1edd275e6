"""Shared fixtures: a single gloo CPU rank inside the test process for single-process model tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def single_rank():
    """megatron-core initialised for one CPU rank (TP=PP=1) in this process, with the CPU harness."""
    from spawn import free_port

    os.environ["MEGATRON_QWEN_DEVICE"] = "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    from megatron_qwen.platform.launch import init_distributed

    init_distributed(1, 1, None, device="cpu")
    yield
