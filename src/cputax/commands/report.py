"""`cputax report DIR`: analyse the run directory again and render its report."""

from __future__ import annotations

from pathlib import Path

from cputax.rundir import RunDir
from cputax.session import rebuild_report

__all__ = ["report"]


def report(run_dir: Path) -> int:
    rebuild_report(RunDir.existing(run_dir))
    return 0
