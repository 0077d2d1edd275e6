"""Shared fixtures: a single gloo CPU rank inside the test process for single-process model tests, and
the training seeds of the learning tests.

A learning test (one that asserts that a model learned: a loss drop, an accuracy) takes the
`training_seed` fixture and trains with it. By default that is None: training.seed's default, the run
that the test file's other checks (layouts, resume) also compare against. `--seeds 1,2,3,4,5` runs each
learning test once per listed training.seed instead (it sets the initial weights and the data order),
which shows that the recipe clears its threshold at any seed and not by luck:

    pytest -q tests -m learning --seeds 1,2,3,4,5
"""

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


def pytest_addoption(parser):
    parser.addoption(
        "--seeds", default=None, metavar="S1,S2,...",
        help="run each learning test (marked `learning`) at these training.seed values (default: training.seed's "
             "default)",
    )


def _seeds(config) -> list:
    text = config.getoption("--seeds")
    if text is None:
        return [None]
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise pytest.UsageError(f"--seeds={text!r} must be comma-separated integers, e.g. --seeds 1,2,3,4,5") from None
    if len(set(seeds)) != len(seeds):
        raise pytest.UsageError(f"--seeds={text!r} lists a seed twice")
    return seeds


def pytest_generate_tests(metafunc):
    """Parametrise every test that takes `training_seed` over --seeds and mark it `learning`."""
    if "training_seed" in metafunc.fixturenames:
        seeds = _seeds(metafunc.config)
        params = [pytest.param(s, marks=pytest.mark.learning,
                               id="default-seed" if s is None else f"seed{s}") for s in seeds]
        metafunc.parametrize("training_seed", params)


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
