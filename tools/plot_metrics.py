"""`megatron-qwen plot` under its former path: `python tools/plot_metrics.py ARGS` is `megatron-qwen plot ARGS`
(the code is in megatron_qwen/cli/)."""

import sys

from megatron_qwen.cli.main import main as megatron_qwen


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen plot ARGV`; returns the exit status."""
    return megatron_qwen(["plot", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
