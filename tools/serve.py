"""`megatron-qwen serve` as a script: `python tools/serve.py ARGS` is `megatron-qwen serve ARGS`
(the code is in megatron_qwen/cli/)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, installed or not
from megatron_qwen.cli.main import main as megatron_qwen  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run `megatron-qwen serve ARGV`; returns the exit status."""
    return megatron_qwen(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
