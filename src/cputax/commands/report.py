"""`cputax report DIR`: analyse the run directory again and render its report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from cputax.analysis.analyse import interrupted_line
from cputax.results.summary import Summary
from cputax.rundir import RunDir
from cputax.session import rebuild_report

__all__ = ["report"]


def report(run_dir: Path) -> int:
    """0, or 1 for a run that was interrupted (its report is written, and says so). A
    summary.json of a format version this cputax does not read (a newer cputax's) is one
    CputaxError line, and is left as it is."""
    run = RunDir.existing(run_dir)
    if run.summary.exists():
        Summary.check_version(run.summary)  # versions 1 and 2 are rebuilt; another is an error
    results = rebuild_report(run)
    line = interrupted_line(results.summary)
    if line:
        Console(stderr=True).print(line, style="red", markup=False, highlight=False)
        return 1
    return 0
