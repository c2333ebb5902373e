"""`cputax extrapolate DIR`: the fit and the users x sub-agents table, kept in the run directory."""

from __future__ import annotations

from pathlib import Path

from cputax.analysis.extrapolate import extrapolate as fit
from cputax.analysis.extrapolate import points_from_run
from cputax.errors import CputaxError
from cputax.report.extrapolation import render
from cputax.results import format as result_format
from cputax.rundir import RunDir

__all__ = ["extrapolate"]


def extrapolate(
    run_dir: Path,
    users: list[int],
    subagents: list[int],
    context: int | None = None,
    as_json: bool = False,
) -> int:
    """Print the table; keep extrapolation.json / .md in the run directory."""
    run = RunDir.existing(run_dir)
    points, left_out = points_from_run(run)
    if len({p.concurrency for p in points}) < 2 and left_out:
        raise CputaxError(
            f"{run_dir}: extrapolation needs batch scenarios at two or more concurrency levels; "
            f"left out: {'; '.join(left_out)}"
        )
    result = fit(points, users, subagents, context)
    result.left_out = left_out
    text = render(result, run_dir)
    result_format.dump(run.extrapolation("json"), result)
    run.extrapolation("md").write_text(text)
    if as_json:
        print(result_format.encode(result).decode())
    else:
        print(text, end="")
    return 0
