"""`cputax compare RUN_A RUN_B`: the comparison as markdown (or JSON) on stdout."""

from __future__ import annotations

import sys
from pathlib import Path

from cputax.analysis.compare import compare_runs
from cputax.report.compare import render_compare
from cputax.results.format import encode

__all__ = ["compare"]


def compare(
    run_a: Path, run_b: Path, names: tuple[str, str] = ("A", "B"), as_json: bool = False
) -> int:
    result = compare_runs(run_a, run_b, names)
    if as_json:
        sys.stdout.buffer.write(encode(result) + b"\n")  # results.comparison.RunComparison
    else:
        sys.stdout.write(render_compare(result))
    sys.stdout.flush()
    return 0
