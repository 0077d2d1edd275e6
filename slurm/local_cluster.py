#!/usr/bin/env python3
"""A two-node Slurm cluster on this machine, for the tests and for trying the sbatch templates.

    python slurm/local_cluster.py up     [--root DIR] [--nodes 2] [--gpus-per-node 2] [--cpus-per-node 4]
    python slurm/local_cluster.py status [--root DIR]
    python slurm/local_cluster.py down   [--root DIR]
    export SLURM_CONF=DIR/slurm.conf   # then sbatch, srun, squeue, scontrol talk to it

It installs nothing: it runs the daemons of Debian's `slurm-wlm` and `munge` packages
(`apt-get install slurm-wlm munge`), as root, with everything (munge key and socket, slurm.conf,
gres.conf, state, spool, logs, fake GPU devices) under one directory (default
``$TMPDIR/megatron-qwen-slurm``) and every daemon on 127.0.0.1:

- one munged with its own key and socket (Slurm's AuthInfo points at it, the host's munge is untouched);
- one slurmctld;
- one slurmd per node (``slurmd -N node1``, ``-N node2``): the nodes share this host, each with its own
  port, spool directory and pid file (Debian's build allows several slurmd per host);
- ``GresTypes=gpu`` with GPUS_PER_NODE fake GPUs per node: character devices made with mknod (NVIDIA's
  major number, 195) listed in gres.conf, so GPU requests (``--gpus-per-node``) are scheduled and
  CUDA_VISIBLE_DEVICES is set as on a real cluster, although the tests' ranks run on CPU.

The daemons run in the foreground of their own sessions; their pids are kept in ROOT/pids.json and
`down` cancels the jobs and stops exactly those processes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
CONF_HEADER = "# Written by slurm/local_cluster.py: a test cluster on one host, every daemon on 127.0.0.1."
NVIDIA_MAJOR = 195  # /dev/nvidiaN are character devices 195:N
# Search the sbin directories too: a non-login root shell may not have them on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])


class ClusterError(RuntimeError):
    """The local cluster cannot start or is not usable; the message says why."""


def default_root() -> Path:
    return Path(os.environ.get("MEGATRON_QWEN_SLURM_ROOT") or Path(tempfile.gettempdir()) / "megatron-qwen-slurm")


def missing_requirements() -> list[str]:
    """What this machine lacks to run the cluster (empty when it can)."""
    missing = []
    binaries = [name for name in DAEMONS + CLIENTS if not shutil.which(name, path=SEARCH_PATH)]
    if binaries:
        missing.append(f"{', '.join(binaries)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        missing.append("root (slurmd runs as root to start jobs as their user; the fake GPUs need mknod)")
    return missing


def _free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on loopback (held open together so that they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """The cluster's files under `root` and the daemons started from them."""

    def __init__(self, root: str | os.PathLike | None = None, nodes: int = 2, gpus_per_node: int = 2,
                 cpus_per_node: int = 4, first_job_id: int | None = None):
        self.root = Path(root or default_root()).resolve()
        # Job ids from a random start: the templates derive the rendezvous port from the job id (20000 + id % 20000),
        # so two local clusters on one host (two test sessions) must not both number their jobs 1, 2, 3. Below
        # 12000 the ports stay under Linux's ephemeral range (32768+), where free_port()-style ports come from.
        self.first_job_id = first_job_id or random.randrange(1000, 12000, 100)
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.gpus_per_node = gpus_per_node
        self.cpus_per_node = cpus_per_node
        self._children: dict[int, subprocess.Popen] = {}  # daemons this process started, reaped when stopped

    # ------------------------------------------------------------------ paths and environment
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def pids_file(self) -> Path:
        return self.root / "pids.json"

    def env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) with SLURM_CONF pointing at this cluster and the sbin dirs on PATH."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster. A query (it changes nothing) that dies of a signal
        is asked again, up to twice: Debian's `scontrol show job` has been seen to crash (SIGSEGV) while the
        controller is busy on a loaded machine."""
        query = cmd[:2] == ("scontrol", "show") or cmd[0] in ("squeue", "sinfo", "sacct")
        for attempt in range(3 if query else 1):
            proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
            if proc.returncode >= 0:
                break
            time.sleep(1 + attempt)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited with {proc.returncode}: "
                               f"{proc.stderr.strip() or proc.stdout.strip()}")
        return proc

    # ------------------------------------------------------------------ start
    def up(self, timeout: float = 60) -> "LocalCluster":
        """Write the configuration and start munged, slurmctld and one slurmd per node; wait until idle."""
        missing = missing_requirements()
        if missing:
            raise ClusterError("cannot start a local Slurm cluster, missing: " + ", ".join(missing))
        if self.running_pids():
            raise ClusterError(
                f"a local cluster is already running from {self.root} (stop it with `down --root {self.root}`)"
            )
        if self.root.exists():
            # Only ever delete a previous cluster's directory (or an empty one), never a directory given by mistake.
            ours = self.conf.is_file() and self.conf.read_text(errors="replace").startswith(CONF_HEADER)
            if any(self.root.iterdir()) and not ours:
                raise ClusterError(f"{self.root} exists and is not a local cluster's directory; choose another --root")
            shutil.rmtree(self.root)
        for sub in ("munge", "state", "log", "spool", "dev"):
            (self.root / sub).mkdir(parents=True)
        # munged wants its socket directory searchable by all, and the key readable by the daemon alone.
        for path in (self.root, self.root / "munge"):
            path.chmod(0o755)
        key = self.root / "munge" / "munge.key"
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        fake_gpus = self._make_fake_gpus()
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self._write_config(ctld_port, node_ports, fake_gpus)

        pids: dict[str, int] = {}
        try:
            munge = self.root / "munge"
            pids["munged"] = self._start(
                "munged", ["munged", "--foreground", f"--key-file={key}", f"--socket={munge / 'munge.socket'}",
                           f"--pid-file={munge / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                           f"--seed-file={munge / 'munged.seed'}"],
            )
            self._wait_for(lambda: (munge / "munge.socket").exists(), "munged's socket", pids, timeout)
            pids["slurmctld"] = self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._wait_for(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld", pids,
                           timeout)
            for node in self.nodes:
                pids[f"slurmd-{node}"] = self._start(f"slurmd-{node}",
                                                     ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
            self.pids_file.write_text(json.dumps(pids, indent=1))

            def idle():
                out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
                states = dict(zip(out[::2], out[1::2]))
                return all(states.get(node) == "idle" for node in self.nodes)

            self._wait_for(idle, "the slurmd nodes to be idle", pids, timeout)
        except BaseException:
            self._stop_pids(pids)
            raise
        return self

    def _make_fake_gpus(self) -> bool:
        """GPUS_PER_NODE character devices per node for gres.conf; False where mknod is not allowed."""
        try:
            for node in self.nodes:
                (self.root / "dev" / node).mkdir()
                for i in range(self.gpus_per_node):
                    os.mknod(self.root / "dev" / node / f"nvidia{i}", 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, i))
            return True
        except PermissionError:
            # Containers without CAP_MKNOD: count-only GPUs still schedule, without CUDA_VISIBLE_DEVICES.
            print("local_cluster: mknod is not allowed here; the fake GPUs are counted, not device files",
                  file=sys.stderr)
            return False

    def _write_config(self, ctld_port: int, node_ports: list[int], fake_gpus: bool) -> None:
        r = self.root
        host = socket.gethostname().split(".")[0]
        lines = [
            CONF_HEADER,
            "ClusterName=megatron-qwen-local",
            # slurmctld checks that its own host name is the controller's; the address is loopback.
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            # A private munged; cred_expire is also the wait before a requeued job may start again
            # (Slurm's default of 120 s would make the requeue test slow).
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'},cred_expire=10",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            # %n: each slurmd of this host gets its own spool directory, pid file and log.
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmdPidFile={r / 'spool' / 'slurmd-%n.pid'}",
            f"SlurmctldPidFile={r / 'state' / 'slurmctld.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups (containers rarely delegate them): track job processes through /proc.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "GresTypes=gpu",
            # The node lines describe fake nodes, not this host's hardware.
            "SlurmdParameters=config_overrides",
            # Schedule as soon as a job is submitted or ends (the backfill scheduler waits up to 30 s).
            "SchedulerType=sched/builtin",
            # ... and look at pending jobs every 2 s rather than 60 s, so a requeued job starts as soon as it may.
            "SchedulerParameters=sched_interval=2",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=3600",  # keep finished jobs visible to `scontrol show job` (there is no accounting)
            "MailProg=/bin/true",
            f"FirstJobId={self.first_job_id}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node} "
                f"RealMemory=4096 Gres=gpu:{self.gpus_per_node} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        gres = ["AutoDetect=off"]
        for node in self.nodes:
            if fake_gpus:
                gres.append(f"NodeName={node} Name=gpu File={r / 'dev' / node}/nvidia[0-{self.gpus_per_node - 1}]")
            else:
                gres.append(f"NodeName={node} Name=gpu Count={self.gpus_per_node}")
        (r / "gres.conf").write_text("\n".join(gres) + "\n")

    def _start(self, name: str, cmd: list[str]) -> int:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        exe = shutil.which(cmd[0], path=SEARCH_PATH)
        proc = subprocess.Popen(
            [exe, *cmd[1:]], env=self.env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the starting process (`up` returns, the daemons stay)
        )
        log.close()
        self._children[proc.pid] = proc
        return proc.pid

    def _wait_for(self, ready, what: str, pids: dict[str, int], timeout: float) -> None:
        deadline = time.time() + timeout
        while not ready():
            dead = [name for name, pid in pids.items() if not _alive(pid)]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout:.0f} s"
                raise ClusterError(f"waiting for {what}: {why}\n{self.logs_tail()}")
            time.sleep(0.2)

    # ------------------------------------------------------------------ inspect and stop
    def running_pids(self) -> dict[str, int]:
        """The daemons of pids.json that are still this cluster's processes."""
        if not self.pids_file.is_file():
            return {}
        pids = json.loads(self.pids_file.read_text())
        return {name: pid for name, pid in pids.items() if _alive(pid) and str(self.root) in _cmdline(pid)}

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def down(self, timeout: float = 60) -> None:
        """Cancel every job, wait for their processes to end, then stop the daemons by pid."""
        pids = self.running_pids()
        if "slurmctld" in pids:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.time() + timeout
                while self.run("squeue", "-h", "-o", "%i", check=False).stdout.split() and time.time() < deadline:
                    time.sleep(0.5)
        self._stop_pids(pids)

    def _stop_pids(self, pids: dict[str, int]) -> None:
        # Reverse start order: the node daemons first, munged (which the others use) last.
        for name, pid in reversed(list(pids.items())):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 20
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            if pid in self._children:
                self._children.pop(pid).wait(timeout=20)
        if self.pids_file.is_file():
            self.pids_file.unlink()

    def status(self) -> str:
        pids = self.running_pids()
        if not pids:
            return f"no local cluster is running from {self.root}"
        text = "\n".join(f"{name}: pid {pid}" for name, pid in pids.items())
        if "slurmctld" in pids:
            text += "\n" + self.run("sinfo", "-N", "-o", "%N %t %c %G", check=False).stdout
        return text + f"\nexport SLURM_CONF={self.conf}"


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie child of ours counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--root", default=None,
                        help="directory of the cluster's files (default: $TMPDIR/megatron-qwen-slurm)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=4)
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.root, args.nodes, args.gpus_per_node, args.cpus_per_node)
    try:
        if args.command == "up":
            cluster.up()
            print(cluster.status())
            print("stop it with: python slurm/local_cluster.py down" + (f" --root {args.root}" if args.root else ""))
        elif args.command == "down":
            was = cluster.running_pids()
            cluster.down()
            print(f"stopped {', '.join(was)}" if was else f"no local cluster was running from {cluster.root}")
        else:
            print(cluster.status())
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
