"""`megatron-qwen generate` under its former path: `python tools/generate.py ARGS` is `megatron-qwen generate ARGS`
(the code is in megatron_qwen/cli/)."""

import sys

from megatron_qwen.cli.main import main as megatron_qwen


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen generate ARGV`; returns the exit status."""
    return megatron_qwen(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
