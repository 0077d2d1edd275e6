"""`megatron-qwen forward` under its former path: `python tools/forward.py ARGS` is `megatron-qwen forward ARGS`
(the code is in megatron_qwen/cli/)."""

import sys

from megatron_qwen.cli.main import main as megatron_qwen


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen forward ARGV`; returns the exit status."""
    return megatron_qwen(["forward", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
