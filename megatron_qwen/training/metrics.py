"""Where training metrics go: the console, ``RUN_DIR/metrics.jsonl`` and Weights & Biases."""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path


def wandb_mode(configured: str) -> str:
    """``auto`` is online when ``WANDB_API_KEY`` is set and offline otherwise; ``WANDB_MODE`` in the
    environment (e.g. ``disabled`` in tests) always wins."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if configured == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return configured


class MetricsLogger:
    """Rank 0's metric sink. Other ranks get a logger whose `log` does nothing."""

    def __init__(self, run_dir: str | os.PathLike, wandb_cfg, config_dict: dict, enabled: bool,
                 run_id: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        self.run_id = run_id
        self._jsonl = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        mode = wandb_mode(wandb_cfg.mode)
        if wandb_cfg.project and mode != "disabled":
            import wandb  # imported only when W&B is on: it costs seconds per process

            # The run id is kept in the checkpoint so a restarted job continues the same W&B run.
            self.run_id = run_id or secrets.token_hex(4)
            self.wandb_run = wandb.init(
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                name=wandb_cfg.name,
                id=self.run_id,
                resume="allow",
                mode=mode,
                dir=str(self.run_dir),
                config=config_dict,
            )

    def log(self, step: int, metrics: dict, console: bool = True, progress: str | None = None) -> None:
        """Record `metrics` for optimizer step `step` everywhere this logger writes; the console line starts
        with `progress` (e.g. ``step 190/200 | 0:01:02 elapsed, ETA 0:00:07``) when given."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if console:
            print(format_metrics(step, metrics, progress), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_metrics(step: int, metrics: dict, progress: str | None = None) -> str:
    """One console line: ``step 120 | loss 5.1234 | lr 3.00e-04 | ...`` (`progress` in place of ``step N``)."""
    parts = [progress or f"step {step}"]
    for key, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, float):
            text = f"{value:.3e}" if (abs(value) < 1e-2 and value != 0) or abs(value) >= 1e5 else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``RUN_DIR/metrics.jsonl`` in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class ProgressClock:
    """Elapsed time and an ETA for the console: ``step 190/200 | 0:01:02 elapsed, ETA 0:00:07``.

    The ETA extrapolates the mean time of the steps run by this process (a resumed job counts from its
    first step here, so start-up and loading do not skew it after a few steps).
    """

    def __init__(self, first_step: int, last_step: int):
        self.first, self.last = first_step, last_step
        self.started = time.monotonic()

    def progress(self, step: int) -> str:
        elapsed = time.monotonic() - self.started
        done = step - self.first
        eta = elapsed / done * (self.last - step) if done > 0 else float("nan")
        return f"step {step}/{self.last} | {_clock(elapsed)} elapsed, ETA {_clock(eta)}"


def _clock(seconds: float) -> str:
    """H:MM:SS, or ? when unknown."""
    if seconds != seconds:  # NaN: nothing measured yet
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
