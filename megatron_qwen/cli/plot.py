"""Draw a run's curves from RUN_DIR/metrics.jsonl into a PNG, with the panels of the stage that wrote it.

    megatron-qwen plot RUN_DIR [--out RUN_DIR/metrics.png] [--metrics KEY,KEY,...]
                                                          (or python tools/plot_metrics.py ...)

For users without W&B: every stage writes each logged metric to RUN_DIR/metrics.jsonl. The stage is told by the
keys in the file: PPO (rewards raw and normalised, KL to the reference, entropy, policy and value loss, response
length, seconds per phase), a preference model (reward model, DPO: loss, accuracy, margin) or a language model
(pretraining, SFT: training and validation loss, learning rate, throughput, gradient norm). `--metrics` draws the
named keys instead, one panel each; `--list` prints the keys the file holds. Exit status 2: no metrics.jsonl, or
none of the asked-for keys in it (the message lists those it has).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from megatron_qwen.training.metrics import read_metrics

# Per stage, its panels: (y label, key patterns). A panel draws every logged key that one of its patterns matches
# whole, so a key renamed within a pattern (kl_to_reference -> kl_to_ref, reward_mean -> reward) still draws.
PPO_LOSSES = (r"policy_loss", r"value_loss")
ACCURACY, MARGIN = (r"(valid_)?(reward_)?accuracy",), (r"(valid_)?(reward_)?margin",)
PPO = (
    ("reward", (r"reward(_raw)?(_mean)?", r"reward_normali[sz]ed(_mean)?")),
    ("KL to the reference", (r"kl(_to_(the_)?ref(erence)?)?(_mean)?",)),
    ("entropy", (r"entropy(_mean)?",)),
    ("loss", PPO_LOSSES),
    ("response length", (r"response_length(_mean)?",)),
    ("seconds", (r"seconds_[a-z_]+", r"[a-z_]+_seconds")),
)
PREFERENCE = (
    ("loss", (r"loss", r"valid_loss")),
    ("accuracy", ACCURACY),
    ("margin", MARGIN),
)
LANGUAGE_MODEL = (
    ("loss", (r"loss", r"valid_loss")),
    ("lr", (r"lr",)),
    ("tokens_per_s", (r"tokens_per_s",)),
    ("grad_norm", (r"grad_norm",)),
)
STAGES = {"PPO": PPO, "preference": PREFERENCE, "language model": LANGUAGE_MODEL}


def numeric_keys(records: list[dict]) -> list[str]:
    """The keys that hold a number in at least one record, in the order they first appear."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                keys.setdefault(key)
    return list(keys)


def _matching(patterns: tuple[str, ...], keys: list[str]) -> list[str]:
    return [key for pattern in patterns for key in keys if re.fullmatch(pattern, key)]


def stage_of(keys: list[str]) -> str:
    """Which stage logged these keys: PPO when its policy or value loss is there, a preference model when an
    accuracy or margin is, else a language model."""
    if _matching(PPO_LOSSES, keys):
        return "PPO"
    if _matching(ACCURACY + MARGIN, keys):
        return "preference"
    return "language model"


def panels(keys: list[str], metrics: list[str] | None = None) -> list[tuple[str, list[str]]]:
    """(y label, keys) of each panel to draw: the stage's panels that have keys, or one panel per key of `metrics`
    that was logged. ValueError when none of `metrics` was (naming the keys there are)."""
    if metrics is not None:
        found = [key for key in metrics if key in keys]
        if not found:
            raise ValueError(f"none of --metrics {','.join(metrics)} was logged; the keys are {', '.join(keys)}")
        return [(key, [key]) for key in found]
    chosen = [(label, _matching(patterns, keys)) for label, patterns in STAGES[stage_of(keys)]]
    return [(label, matched) for label, matched in chosen if matched]


def plot(run_dir: Path, out: Path, metrics: list[str] | None = None) -> Path:
    """Write the figure of `run_dir`'s metrics (the stage's panels, or `metrics`); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    keys = numeric_keys(records)
    chosen = panels(keys, metrics)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.6 * len(chosen)), sharex=True, squeeze=False)
    for ax, (label, panel_keys) in zip(axes[:, 0], chosen):
        for key in panel_keys:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(panel_keys) > 1:
            ax.legend()
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(f"{run_dir} ({stage_of(keys)})" if metrics is None else str(run_dir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen plot ARGV`; prints the PNG's path; returns the exit status."""
    parser = argparse.ArgumentParser(prog="megatron-qwen plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="the run's logging.run_dir (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/metrics.png)")
    parser.add_argument("--metrics", default=None, help="comma-separated logged keys to draw, one panel each")
    parser.add_argument("--list", action="store_true", help="print the logged keys and exit")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}/metrics.jsonl does not exist; pass the run's logging.run_dir", file=sys.stderr)
        return 2
    metrics = None
    if args.metrics is not None:
        metrics = [key.strip() for key in args.metrics.split(",") if key.strip()]
        if not metrics:
            parser.error("--metrics takes logged keys separated by commas, e.g. --metrics loss,lr")
    try:
        if args.list:
            print("\n".join(numeric_keys(read_metrics(args.run_dir))))
            return 0
        path = plot(args.run_dir, args.out or args.run_dir / "metrics.png", metrics)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if metrics is not None and len(metrics) > 1:
        absent = [key for key in metrics if key not in numeric_keys(read_metrics(args.run_dir))]
        if absent:
            print(f"note: not logged, not drawn: {', '.join(absent)}", file=sys.stderr)
    print(path)
    return 0
