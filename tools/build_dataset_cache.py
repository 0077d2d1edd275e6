"""`megatron-qwen build-cache` under its former path: `python tools/build_dataset_cache.py ARGS` is `megatron-qwen build-cache ARGS`
(the code is in megatron_qwen/cli/)."""

import sys

from megatron_qwen.cli.main import main as megatron_qwen


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen build-cache ARGV`; returns the exit status."""
    return megatron_qwen(["build-cache", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
