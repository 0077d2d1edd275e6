"""Draw a run's loss, learning-rate and throughput curves from RUN_DIR/metrics.jsonl into a PNG.

    python tools/plot_metrics.py RUN_DIR [--out RUN_DIR/metrics.png]

For users without W&B: the training loop writes every logged metric to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_qwen.training.metrics import read_metrics

PANELS = (("loss", "valid_loss"), ("lr",), ("tokens_per_s",), ("grad_norm",))


def plot(run_dir: Path, out: Path) -> Path:
    """Write the figure; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no records yet")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.6 * len(PANELS)), sharex=True)
    for ax, keys in zip(axes, PANELS):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=key)
        ax.set_ylabel(keys[0])
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    axes[-1].set_xlabel("step")
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = parser.parse_args(argv)
    if not (args.run_dir / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}/metrics.jsonl does not exist; pass the run's logging.run_dir", file=sys.stderr)
        return 2
    try:
        path = plot(args.run_dir, args.out or args.run_dir / "metrics.png")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
