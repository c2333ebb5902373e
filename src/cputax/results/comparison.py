"""`cputax compare A B` as a typed result: per scenario, every component of the two runs,
each delta judged against the run-to-run spread (analysis.compare decides; report renders).

It is printed, not kept in a run directory: `cputax compare --json` writes it (with
`format_version`), and RunComparison.load reads such a file back. Version 1 is the JSON
printed before versions existed (no `format_version`, no `noise`, no `groups`); its fields
are version 2's. The Delta row is shared with the sweep's comparison (results.sweep).
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from cputax.results import format as result_format
from cputax.results.summary import RunInfo

__all__ = ["FORMAT_VERSION", "READS", "Delta", "RunComparison", "ScenarioComparison"]

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: compare's JSON before format versions; its fields are version 2's


class Delta(msgspec.Struct, kw_only=True):
    """B - A of one measurement. `within_spread`: True when the delta is no larger than
    `noise` (the larger of the two spreads), False beyond it, None when there is no delta or
    no spread measure. `delta_pct` (the change relative to A) is None for a percentage,
    whose change is already in points, and where A is zero."""

    component: str
    a: float | None = None
    b: float | None = None
    delta: float | None = None
    delta_pct: float | None = None
    spread_a: float | None = None
    spread_b: float | None = None
    noise: float | None = None
    within_spread: bool | None = None
    # the phases' medians and tails of each side (ms); None for the ratios
    p50_a: float | None = None
    p50_b: float | None = None
    p99_a: float | None = None
    p99_b: float | None = None


class ScenarioComparison(msgspec.Struct, kw_only=True):
    name: str
    concurrency: int | None = None
    context_tokens: int | None = None
    requests: list[int] = []  # A's, B's
    components: list[Delta] = []


class RunComparison(msgspec.Struct, kw_only=True):
    """Two runs side by side. `groups`: the slices an open-loop scenario is cut into for the
    spread (analysis.compare.GROUPS)."""

    format_version: int = FORMAT_VERSION
    names: list[str]
    runs: list[str]
    run_info: list[RunInfo] = []
    scenarios: list[ScenarioComparison] = []
    only_in_a: list[str] = []
    only_in_b: list[str] = []
    groups: int | None = None

    @classmethod
    def load(cls, path: Path) -> RunComparison:
        """Read a saved `cputax compare --json` (versions READS); another is one CputaxError
        line."""
        return result_format.load(path, cls, READS, "run `cputax compare --json` again")

    def dump(self, path: Path) -> None:
        result_format.dump(path, self)
