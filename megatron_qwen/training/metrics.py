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

    def __init__(self, run_dir: str | os.PathLike, wandb_cfg, config_dict: dict, enabled: bool, run_id: str | None = None):
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
            import wandb

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

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        """Record `metrics` for optimizer step `step` everywhere this logger writes."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        if console:
            print(format_metrics(step, metrics), flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def format_metrics(step: int, metrics: dict) -> str:
    """One console line: ``step 120 | loss 5.1234 | lr 3.00e-04 | ...``."""
    parts = [f"step {step}"]
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
