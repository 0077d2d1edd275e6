"""Several `megatron-qwen` commands in one launch (the ranks' imports are paid once): each argument is a JSON list,
the command's name and its arguments, e.g. '["long-ppl", "--ckpt", "C", ...]'. Runs them in order on every rank
through the commands' re-entrant `main`; exits with the first non-zero status."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megatron_qwen.cli.main import COMMANDS  # noqa: E402


def main(argv: list[str]) -> int:
    import torch

    try:
        for spec in argv:
            command, *args = json.loads(spec)
            status = importlib.import_module(COMMANDS[command][0]).main(args)
            if status:
                return status
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
