"""Launch a script on several gloo CPU ranks with torchrun, as users do, and report its output."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env(**extra: str) -> dict:
    """Environment for CPU ranks: the CPU harness forced, one thread per rank, W&B never online."""
    env = dict(os.environ)
    env.update(
        MEGATRON_QWEN_DEVICE="cpu",
        OMP_NUM_THREADS="1",
        WANDB_MODE="disabled",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL `pid`, its process group and every process below it: torchrun starts each rank in a session of its
    own, so killing torchrun's group alone would leave the ranks running."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        procs = []
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=60)


def _run_group(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own: on a timeout the whole group (torchrun and its ranks) is killed,
    so no rank outlives the test, spinning on the CPU the next tests need or holding the output pipes open."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_torchrun(nproc: int, argv: list[str], timeout: float = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc-per-node nproc ARGV`` on loopback; fail the test with its output on error."""
    for _attempt in range(3):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            *argv,
        ]
        proc = _run_group(cmd, env or cpu_env(), timeout)
        # The free port can be taken by another process before torchrun binds it: try another one.
        if "EADDRINUSE" not in proc.stderr:
            break
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-8000:]}\n--- stderr "
            f"---\n{proc.stderr[-8000:]}"
        )
    return proc
