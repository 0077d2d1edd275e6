"""The run context: everything a job derives from its config and launcher, resolved once at start.

`start_run(cfg)` installs the preemption flag, reads the launcher, validates the config for the world
size, resolves the runtime (device, dtype, Transformer Engine), creates the process groups, writes the
run directory, finds the checkpoint to resume and opens the metrics logger. Every part of a stage (the
single-model loop, PPO's loop) takes the `RunContext` instead of re-deriving any of it.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from megatron.core import parallel_state

from megatron_qwen.checkpoint import directory as ckdir
from megatron_qwen.checkpoint.safety import TRUST_WARNING
from megatron_qwen.config import Config, ParallelLayout, resolve
from megatron_qwen.platform.launch import LaunchInfo, detect_launch, init_distributed
from megatron_qwen.platform.runtime import Runtime, resolve_runtime
from megatron_qwen.checkpoint.io import saved_train_state
from megatron_qwen.training.metrics import MetricsLogger

EXIT_PREEMPTED = 75  # saved on SIGTERM/SIGUSR1; the launcher may requeue (sysexits' EX_TEMPFAIL)


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (Slurm's warning before the time limit, or preemption)."""

    def __init__(self):
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        """True on every rank when any rank got a signal (one collective per step)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0


class Faults:
    """The config's fault injection (``faults.*``), the one channel tests use to exercise failure paths."""

    def __init__(self, cfg: Config):
        self.nan_loss_steps = {int(s) for s in cfg.faults.nan_loss_at}
        self.kill_step = cfg.faults.kill_during_save_at

    def nan_loss(self, step: int) -> bool:
        """Whether the loss of (1-based) step `step` is to be replaced by NaN."""
        return step in self.nan_loss_steps

    def before_commit(self, path: Path) -> None:
        """Called between writing a checkpoint and making it current: dies there at the chosen step."""
        if self.kill_step is not None and path.name == ckdir.checkpoint_name(self.kill_step):
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class RunContext:
    """A running job's resolved config, layout, runtime, directories, resume point, logger and flags."""

    cfg: Config
    layout: ParallelLayout
    launch: LaunchInfo
    runtime: Runtime
    run_dir: Path
    save_dir: Path
    resume_from: Path | None  # the checkpoint the job continues from (None: a fresh start)
    saved_state: dict  # its loop state (empty for a fresh start)
    logger: MetricsLogger
    preemption: PreemptionFlag
    faults: Faults
    dp_rank: int  # this rank's data-parallel replica

    @property
    def rank0(self) -> bool:
        return self.launch.rank == 0

    def say(self, text: str, error: bool = False) -> None:
        """Print one line from rank 0."""
        if self.rank0:
            print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        self.logger.close()


def start_run(cfg: Config) -> RunContext:
    """Resolve and start a job for `cfg` on this process's rank (see the module docstring)."""
    # Installed first: a USR1/TERM while the model builds or loads is honoured at the first step.
    preemption = PreemptionFlag()
    launch = detect_launch()
    cfg, layout, notes = resolve(cfg, launch.world_size)
    runtime = resolve_runtime(cfg, launch.local_rank)
    p, t = cfg.parallel, cfg.training
    init_distributed(layout.tp, layout.pp, layout.vpp, p.device, p.timeout_minutes, t.seed, p.io_timeout_minutes,
                     cp=layout.cp, ep=layout.ep, etp=layout.etp)
    run_dir = Path(cfg.logging.run_dir)
    save_dir = Path(t.save or run_dir / "checkpoints")
    if launch.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        print(runtime.describe(), flush=True)
        for note in notes:
            print(f"note: {note}", flush=True)
    resume_from = ckdir.latest_checkpoint(t.load or save_dir)
    if t.trust_checkpoint and launch.rank == 0 and (resume_from is not None or t.init_from or cfg.ppo.policy_from):
        print(f"warning: training.trust_checkpoint=true: {TRUST_WARNING}", file=sys.stderr, flush=True)
    saved = saved_train_state(resume_from, t.trust_checkpoint) if resume_from is not None else {}
    logger = MetricsLogger(run_dir, cfg.logging.wandb, cfg.to_dict(), enabled=launch.rank == 0,
                           run_id=saved.get("wandb_run_id"))
    return RunContext(cfg, layout, launch, runtime, run_dir, save_dir, resume_from, saved, logger, preemption,
                      Faults(cfg), parallel_state.get_data_parallel_rank())
