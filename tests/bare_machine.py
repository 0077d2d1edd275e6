"""Run a script as a bare GPU machine would: without the compiled extension (megatron_qwen._C) and without the
packages such a machine lacks (only torch, transformers, tiktoken and the carried megatron-core, torchao and psutil
wheels: megatron-core's checkpoint writer needs psutil, and a save without it hangs).

    python tests/bare_machine.py [--also-block NAME ...] SCRIPT [ARGS ...]

Importing any of them fails with ImportError, as it would there, and their installed metadata is hidden too
(the dashscope wheel is found through it, not imported). Python subprocesses the script starts (torchrun and
its ranks) are bare in the same way: a `sitecustomize` on their PYTHONPATH installs the same blocking.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import os
import runpy
import sys
import tempfile
from pathlib import Path

BLOCKED = {"megatron_qwen._C", "pybind11", "wandb", "matplotlib", "dashscope", "mpi4py"}
ENV = "BARE_MACHINE_BLOCKED"


class _Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name in self.names or name.split(".")[0] in self.names:
            raise ImportError(f"{name} is not available on a bare GPU machine")
        return None


def block(names: set[str]) -> None:
    """Make `names` unimportable and their distributions unknown in this process."""
    sys.meta_path.insert(0, _Blocker(names))
    distribution = importlib.metadata.distribution

    def hidden(name: str):
        if name in names:
            raise importlib.metadata.PackageNotFoundError(name)
        return distribution(name)

    importlib.metadata.distribution = hidden


def main() -> None:
    args, blocked = sys.argv[1:], set(BLOCKED)
    while args and args[0] == "--also-block":
        blocked.add(args[1])
        args = args[2:]
    block(blocked)
    # Subprocesses: the same blocking from a sitecustomize that imports this file.
    site = Path(tempfile.mkdtemp(prefix="bare_machine_"))
    (site / "sitecustomize.py").write_text(
        f"import os, sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport bare_machine\n"
        f"bare_machine.block(set(os.environ[{ENV!r}].split(',')))\ndel sys.path[0]\n")
    os.environ[ENV] = ",".join(sorted(blocked))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    sys.argv = args
    runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
