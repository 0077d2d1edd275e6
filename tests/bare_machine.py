"""Run a script as a bare GPU machine would: without the compiled extension (megatron_qwen._C) and without the
packages such a machine lacks (only torch, transformers, tiktoken and the carried megatron-core / torchao wheels).

    python tests/bare_machine.py [--also-block NAME ...] SCRIPT [ARGS ...]

Importing any of them fails with ImportError, as it would there.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED = {"megatron_qwen._C", "pybind11", "wandb", "psutil", "matplotlib", "dashscope", "mpi4py"}


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name in self.names or name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not available on a bare GPU machine")
        return None


def main() -> None:
    args, blocked = sys.argv[1:], set(BLOCKED)
    while args and args[0] == "--also-block":
        blocked.add(args[1])
        args = args[2:]
    sys.meta_path.insert(0, _Blocker(blocked))
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
