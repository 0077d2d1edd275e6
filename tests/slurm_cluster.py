"""A local two-node Slurm cluster for tests (slurm/local_cluster.py) and helpers to submit and watch jobs.

Use the fixture by importing it into a test module: ``from slurm_cluster import slurm_cluster``. Without the
Slurm and munge daemons (``apt-get install slurm-wlm munge``) or without root, the tests that use it are
skipped with the reason, except when the environment variable CI is set: there they fail, so that CI
cannot pass without running them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from spawn import REPO

_spec = importlib.util.spec_from_file_location("local_cluster", REPO / "slurm" / "local_cluster.py")
local_cluster = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local_cluster)

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


class SlurmCluster:
    """The running local cluster, as the tests use it."""

    def __init__(self, cluster):
        self.cluster = cluster

    def env(self, base: dict) -> dict:
        """`base` plus what Slurm's commands need to reach this cluster. Slurm variables of an allocation the
        tests may run in are dropped: a template would take them for its own job's."""
        return self.cluster.env({k: v for k, v in base.items() if not k.startswith("SLURM_")})

    def submit(self, argv: list[str], env: dict) -> int:
        """Run a submitting command (sbatch, or a template executed directly) and return the job id."""
        proc = subprocess.run(argv, cwd=REPO, env=self.env(env), capture_output=True, text=True, timeout=60)
        match = re.search(r"Submitted batch job (\d+)", proc.stdout)
        if proc.returncode != 0 or not match:
            raise AssertionError(f"{' '.join(map(str, argv))} exited with "
                                 f"{proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return int(match.group(1))

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -d` as a dict (JobState, Restarts, ExitCode, NodeList, JOB_GRES, StdOut, ...)."""
        out = self.cluster.run("scontrol", "show", "job", "-d", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, log: Path | None = None) -> dict[str, str]:
        """Wait until the job has finished for good (a requeued job is pending again, not finished)."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info["JobState"] in FINISHED:
                return info
            if time.time() > deadline:
                self.cluster.run("scancel", str(job_id), check=False)
                text = log.read_text() if log and log.is_file() else ""
                raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout:.0f} "
                                     f"s\n{text[-6000:]}\n{self.cluster.logs_tail()}")
            time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """munged + slurmctld + slurmd node1, node2 (2 fake GPUs and 4 CPUs each) on loopback, for the session."""
    missing = local_cluster.missing_requirements()
    if missing:
        reason = "needs a local Slurm: missing " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    # A short directory: munge's socket path must fit a Unix socket address (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="mq-slurm-"))
    cluster = local_cluster.LocalCluster(root, nodes=2, gpus_per_node=2, cpus_per_node=4)
    try:
        cluster.up()
    except local_cluster.ClusterError as exc:
        pytest.fail(f"the local Slurm cluster did not start: {exc}")
    try:
        yield SlurmCluster(cluster)
    finally:
        cluster.down()
        # The daemons' logs outlive the cluster, next to the tests' other temporary files, for post-mortems.
        shutil.copytree(root / "log", tmp_path_factory.getbasetemp() / "slurm-logs", dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
