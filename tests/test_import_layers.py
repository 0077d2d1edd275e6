"""The package layering of pyproject.toml's import-linter contract holds, and the contract does catch a
violation (a copy of the package with one forbidden import planted in it)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from spawn import REPO

LINT = Path(sys.executable).parent / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    # grimp finds the package on sys.path: the tree under test, and nothing else of the project.
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(REPO / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_package_keeps_its_layers():
    proc = lint(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout


def test_a_forbidden_import_breaks_the_contract(tmp_path):
    shutil.copytree(REPO / "megatron_qwen", tmp_path / "megatron_qwen",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    rope = tmp_path / "megatron_qwen" / "model" / "rotary.py"
    rope.write_text(rope.read_text()
                    + "\nfrom megatron_qwen.training import loop  # the model must not know the loop\n")
    proc = lint(tmp_path)
    assert proc.returncode != 0
    assert ("BROKEN" in proc.stdout
            and "megatron_qwen.model.rotary -> megatron_qwen.training.loop" in proc.stdout), proc.stdout
