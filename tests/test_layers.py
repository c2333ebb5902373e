"""The layering is a checked contract: `lint-imports` against pyproject.toml's
[tool.importlinter] (layers in ../shared/DESIGN.md's order, report never importing
analysis, analysis never importing client or targets, no import cycles)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> list[str]:
    exe = Path(sys.executable).parent / "lint-imports"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("lint-imports")
    if found is None:
        pytest.skip("needs import-linter (the [test] extra)")
    return [found]


def test_no_import_runs_up_a_layer_or_in_a_circle():
    proc = subprocess.run(
        [*_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout
