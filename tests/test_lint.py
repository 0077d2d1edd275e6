"""The tree passes pyproject.toml's ruff gate (all of pyflakes: unused imports, undefined names, ...; lines of at
most 120 characters), and the gate does catch each of those (a file with one planted finding of each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from spawn import REPO

RUFF = Path(sys.executable).parent / "ruff"


def ruff(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUFF), "check", "--no-cache", "--output-format", "concise", "--config",
                           str(REPO / "pyproject.toml"), str(target)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_the_tree_passes_ruff():
    proc = ruff(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_catches_each_rule(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import os\n\n\ndef f():\n    return undefined_name\n\n\nX = \"" + "x" * 120 + "\"\n")
    proc = ruff(planted)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for finding in ("F401 [*] `os` imported but unused", "F821 Undefined name `undefined_name`",
                    "E501 Line too long (126 > 120)"):
        assert finding in proc.stdout, proc.stdout
