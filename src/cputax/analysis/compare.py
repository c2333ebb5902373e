"""Two runs side by side: the study's CPU% comparison (e.g. HBM prefix cache vs LMCache)
and every component's delta, with the run-to-run spread next to it.

Spread: each run's requests of a scenario are cut into groups (its closed-loop batches,
else GROUPS consecutive slices in arrival order) and each component is computed per
group; the range of the group values is that run's spread. A difference no larger than
the larger of the two spreads is reported as inside the spread, not as a difference.

The comparison is a results.comparison.RunComparison, built whole here: the report renders
its fields and judges nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cputax.analysis.decompose import PHASES, completed, summarize_scenario
from cputax.errors import CputaxError
from cputax.records import RequestTable
from cputax.results.comparison import Delta, RunComparison, ScenarioComparison
from cputax.results.summary import ScenarioSummary
from cputax.rundir import RunDir

__all__ = [
    "GROUPS",
    "RATIOS",
    "TELEMETRY",
    "compare_runs",
    "compare_scenario",
    "delta_row",
    "groups",
    "load_run",
    "spreads",
]

GROUPS = 4  # slices of an open-loop scenario (or one batch) for the spread
RATIOS = ("cpu_pct", "gpu_pct")
TELEMETRY = ("busy_pct", "stall_pct")  # from correlation.json, when both runs have GPU telemetry


def load_run(run_dir: Path) -> dict[str, Any]:
    run = RunDir(run_dir)
    if not run.summary.exists():
        raise CputaxError(
            f"{run_dir}: no summary.json; is it a run directory? "
            f"(`cputax report {run_dir}` rebuilds it)"
        )
    return {
        "dir": run_dir,
        "summary": run.read_summary(),
        "table": run.read_request_table(),
        "correlation": run.read_optional(run.correlation),
    }


def groups(table: RequestTable) -> list[RequestTable]:
    """The batches of a closed-loop scenario, else GROUPS consecutive slices by start time,
    of the requests that completed."""
    done = table.where(completed(table))
    done = done.where(np.argsort(done["t_start"], kind="stable"))
    batch = done["batch"]
    batches = np.unique(batch[~np.isnan(batch)])
    if len(batches) >= 2 and not np.isnan(batch).any():
        return [done.where(batch == b) for b in batches]
    n = len(done)
    if n < GROUPS:
        return []
    return [done.where(np.arange(i * n // GROUPS, (i + 1) * n // GROUPS)) for i in range(GROUPS)]


def _value(s: ScenarioSummary, component: str) -> float | None:
    return getattr(s, component) if component in RATIOS else getattr(s.mean_ms, component)


def spreads(scenario: dict[str, Any], table: RequestTable) -> dict[str, float | None]:
    """Per component, the range of its per-group values (None: too few groups to say)."""
    per_group = [summarize_scenario(scenario, g) for g in groups(table)]
    out = {}
    for component in (*PHASES, *RATIOS):
        values = [v for s in per_group if (v := _value(s, component)) is not None]
        out[component] = max(values) - min(values) if len(values) >= 2 else None
    return out


def delta_row(
    component: str,
    a: float | None,
    b: float | None,
    spread_a: float | None,
    spread_b: float | None,
    in_points: bool = False,
    **quantiles: float | None,
) -> Delta:
    """B - A for one component, marked inside the run-to-run spread when no larger than the
    larger of the two runs' spreads (None: no spread measure). `in_points`: the component is
    a percentage, whose change is in points and has no relative change."""
    delta = None if a is None or b is None else b - a
    noise = max((s for s in (spread_a, spread_b) if s is not None), default=None)
    relative = None if delta is None or not a or in_points else 100.0 * delta / a
    return Delta(
        component=component,
        a=a,
        b=b,
        delta=delta,
        delta_pct=relative,
        spread_a=spread_a,
        spread_b=spread_b,
        noise=noise,
        within_spread=None if delta is None or noise is None else abs(delta) <= noise,
        **quantiles,
    )


def _gpu(run: dict[str, Any], name: str) -> dict[str, Any] | None:
    corr = run["correlation"] or {}
    return next((s.get("gpu") for s in corr.get("scenarios", []) if s["name"] == name), None)


def _asked(s: ScenarioSummary) -> dict[str, Any]:
    """The profile's scenario as summarize_scenario reads it, from its summary."""
    return {"name": s.name, "concurrency": s.concurrency, "context_tokens": s.context_tokens}


def compare_scenario(
    a: dict[str, Any], b: dict[str, Any], sa: ScenarioSummary, sb: ScenarioSummary
) -> ScenarioComparison:
    name = sa.name
    spread_a = spreads(_asked(sa), a["table"].of_scenario(name))
    spread_b = spreads(_asked(sb), b["table"].of_scenario(name))
    rows = []
    for component in (*PHASES, *RATIOS):
        quantiles = {}
        if component not in RATIOS:
            quantiles = {
                f"{q}_{side}": getattr(getattr(s, f"{q}_ms"), component)
                for q in ("p50", "p99")
                for side, s in (("a", sa), ("b", sb))
            }
        rows.append(
            delta_row(
                component,
                _value(sa, component),
                _value(sb, component),
                spread_a[component],
                spread_b[component],
                in_points=component in RATIOS,
                **quantiles,
            )
        )
    ga, gb = _gpu(a, name), _gpu(b, name)
    if ga and gb:
        rows += [delta_row(f"gpu_{k}", ga[k], gb[k], None, None, in_points=True) for k in TELEMETRY]
    return ScenarioComparison(
        name=name,
        concurrency=sa.concurrency,
        context_tokens=sa.context_tokens,
        requests=[sa.requests, sb.requests],
        components=rows,
    )


def compare_runs(dir_a: Path, dir_b: Path, names: tuple[str, str] = ("A", "B")) -> RunComparison:
    a, b = load_run(dir_a), load_run(dir_b)
    by_name_b = {s.name: s for s in b["summary"].scenarios}
    names_a = [s.name for s in a["summary"].scenarios]
    scenarios = [
        compare_scenario(a, b, s, by_name_b[s.name])
        for s in a["summary"].scenarios
        if s.name in by_name_b
    ]
    return RunComparison(
        names=list(names),
        runs=[str(dir_a), str(dir_b)],
        run_info=[a["summary"].run, b["summary"].run],
        scenarios=scenarios,
        only_in_a=[n for n in names_a if n not in by_name_b],
        only_in_b=[n for n in by_name_b if n not in names_a],
        groups=GROUPS,
    )
