"""A sweep's comparison: per scenario and configuration, the measurements the study's claims
turn on, each delta against the baseline (the first configuration) marked inside or beyond
the run-to-run spread, as `cputax compare` does.

A configuration's value is the mean over its repeats. Its spread is the largest of the
within-run spread (the range over a run's batches, analysis.compare.spreads: phases and
CPU% only), the width of the 95% Wilson interval of a py-spy share of the engine loop
(analysis.support.wilson: a share of few samples is not called a change) and the range
over its repeats; with one repeat, no batches and no samples a delta has no spread measure
and says so. The comparison is a results.sweep.SweepComparison, built whole here and kept
in sweep.json; the report renders it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from cputax.analysis.claims import claims
from cputax.analysis.compare import delta_row, spreads
from cputax.analysis.support import wilson
from cputax.records import RequestTable
from cputax.results.attribution import AttributionResult, ThreadRow, Window
from cputax.results.correlation import CorrelationResult, HostUsage
from cputax.results.summary import ScenarioSummary, Summary
from cputax.results.sweep import (
    METRICS,
    ConfigScenario,
    Configuration,
    EngineLoop,
    GilRow,
    MetricValue,
    ServerInfo,
    SweepComparison,
    SweepDelta,
    TargetInfo,
)
from cputax.rundir import SweepDir
from cputax.servers import IDLE, OTHER
from cputax.util import average

__all__ = [
    "FINISHED",
    "SPREAD_PHASES",
    "ConfigRun",
    "analyse_sweep",
    "engine_loop",
    "gil_rows",
    "load_config_runs",
    "role_categories",
    "scenario_metrics",
]

# metric -> the phase analysis.compare.spreads measures its within-run spread by
SPREAD_PHASES = {
    "http_overhead_ms": "http_overhead",
    "prefill_ms": "prefill",
    "decode_ms": "decode",
    "cpu_pct": "cpu_pct",
}
# metric -> the engine loop's share it is (in %): its spread is the share's Wilson interval
LOOP_SHARES = {"schedule_share": "schedule", "worker_wait_share": "worker_wait"}
FINISHED = ("ok", "errors")  # the steps whose run directory is measured
ROLES = ("api_server", "engine_core", "worker")


@dataclass
class ConfigRun:
    """One finished run directory of a configuration, its files read."""

    folder: str
    summary: Summary
    info: dict[str, Any]  # run.json
    attribution: AttributionResult | None
    correlation: CorrelationResult | None
    table: RequestTable


def load_config_runs(sweep: SweepDir, folders: list[str]) -> list[ConfigRun]:
    """The finished run directories of one configuration."""
    runs = []
    for folder in folders:
        run = sweep.run(folder)
        if not run.summary.exists():
            continue
        attribution = AttributionResult.load(run.attribution) if run.attribution.exists() else None
        correlation = CorrelationResult.load(run.correlation) if run.correlation.exists() else None
        runs.append(
            ConfigRun(
                folder=folder,
                summary=run.read_summary(),
                info=run.info(),
                attribution=attribution,
                correlation=correlation,
                table=run.read_request_table(),
            )
        )
    return runs


def _window(run: ConfigRun, name: str) -> Window | None:
    if run.attribution is None:
        return None
    return next((w for w in run.attribution.windows if w.name == name), None)


def _host(run: ConfigRun, name: str) -> HostUsage | None:
    found = [s for s in run.correlation.scenarios if s.name == name] if run.correlation else []
    return found[0].host if found else None


def _roles(window: Window | None) -> dict[int | None, str]:
    return {p.pid: p.role for p in window.processes} if window else {}


def _threads(window: Window | None) -> list[ThreadRow]:
    return window.threads if window else []


def role_categories(window: Window | None) -> dict[str, dict[str, float]]:
    """Per process role, where its threads' time went, in % of one core (summed over the
    role's processes and threads: two API servers' tokenize add up)."""
    out: dict[str, dict[str, float]] = {}
    roles = _roles(window)
    for row in _threads(window):
        role = roles.get(row.pid, "process")
        cats = out.setdefault(role, {})
        for cat, share in row.categories.items():
            if cat not in (IDLE, OTHER):
                cats[cat] = cats.get(cat, 0.0) + 100.0 * share
    return out


def engine_loop(window: Window | None) -> EngineLoop | None:
    """The engine loop thread's shares (vLLM: EngineCore's MainThread), None without one."""
    roles = _roles(window)
    rows = [
        r
        for r in _threads(window)
        if roles.get(r.pid) == "engine_core" and r.thread == "MainThread"
    ]
    if not rows:
        return None
    cats = rows[0].categories
    return EngineLoop(
        worker_wait=cats.get("worker_wait", 0.0),
        schedule=cats.get("schedule", 0.0) + cats.get("kv_cache", 0.0),
        ipc=cats.get("ipc", 0.0),
        busy=rows[0].active or 0.0,
        samples=rows[0].samples,
    )


def loop_intervals(loop: EngineLoop | None) -> dict[str, float]:
    """Per LOOP_SHARES metric, the width of its share's 95% Wilson interval (in points)."""
    if loop is None:
        return {}
    return {
        key: 100.0 * (hi - lo)
        for key, share in LOOP_SHARES.items()
        for lo, hi in [wilson(getattr(loop, share), loop.samples)]
    }


def _prefix_hash_share(window: Window | None) -> float | None:
    roles = _roles(window)
    rows = [r for r in _threads(window) if roles.get(r.pid) == "engine_core"]
    busy = sum(r.active or 0.0 for r in rows)
    if not rows or busy <= 0:
        return None
    return 100.0 * sum(r.categories.get("prefix_hash", 0.0) for r in rows) / busy


def gil_rows(window: Window | None) -> list[GilRow]:
    """Threads with GIL data (--pyspy-gil): held, estimated wait, held in idle frames."""
    roles = _roles(window)
    return [
        GilRow(
            role=roles.get(r.pid, "process"),
            process=r.process,
            thread=r.thread,
            busy=r.active,
            held=r.gil,
            wait=r.gil_wait,
            in_idle_frames=r.gil_in_idle_frames,
            idle_frames=list(r.gil_idle_frames),
        )
        for r in _threads(window)
        if r.gil is not None
    ]


def scenario_metrics(
    summary: ScenarioSummary, window: Window | None, host: HostUsage | None
) -> dict[str, float | None]:
    """One run's measurements of one scenario (METRICS)."""
    mean = summary.mean_ms
    server = summary.server.mean_ms if summary.server is not None else {}
    out_tokens = summary.output_tokens_mean
    ttft = (
        None
        if mean.prefill is None
        else (mean.serialize or 0.0) + (mean.http_overhead or 0.0) + mean.prefill
    )
    itl = (
        mean.decode / (out_tokens - 1)
        if mean.decode is not None and out_tokens and out_tokens > 1
        else None
    )
    values: dict[str, float | None] = {
        "http_overhead_ms": mean.http_overhead,
        "queue_ms": server.get("queue"),
        "prefill_ms": mean.prefill,
        "decode_ms": mean.decode,
        "ttft_ms": ttft,
        "itl_ms": itl,
        "output_tokens_per_s": (
            summary.throughput.output_tokens_per_s if summary.throughput else None
        ),
        "cpu_pct": summary.cpu_pct,
        "prefix_hash_share": _prefix_hash_share(window),
        "total_ms": mean.total,
        "gpu_bubble_pct": summary.gpu_bubble_pct,
    }
    loop = engine_loop(window)
    for key, share in LOOP_SHARES.items():
        values[key] = None if loop is None else 100.0 * getattr(loop, share)
    roles = _roles(window)
    for role in ROLES:
        procs = [
            p
            for p in (host.processes if host else [])
            if (roles.get(p.pid) or p.server_role) == role
        ]
        values[f"{role}_cpu_pct"] = sum(p.cpu_pct for p in procs) if procs else None
    return values


def _metric(values: list[float], within: list[float], basis: list[str]) -> MetricValue:
    """The mean of a configuration's repeats, and its spread: the largest of the range over
    the repeats (two or more) and the within-run spreads."""
    candidates = [max(values) - min(values)] if len(values) >= 2 else []
    candidates += within
    spread = max(candidates) if candidates else None
    return MetricValue(
        value=average(values),
        spread=spread,
        values=values,
        half_spread=None if spread is None else spread / 2,
        spread_basis=(["repeats"] if len(values) >= 2 else []) + basis,
    )


def _config_scenario(runs: list[ConfigRun], name: str) -> ConfigScenario | None:
    """A configuration's view of one scenario over its repeats: value, spread, the values."""
    per_run = []
    for run in runs:
        summary = run.summary.scenario(name)
        if summary is None:
            continue
        window, host = _window(run, name), _host(run, name)
        asked = next(s for s in run.info["scenarios"] if s["name"] == name)
        by_phase = spreads(asked, run.table.of_scenario(name))
        within = {key: by_phase.get(phase) for key, phase in SPREAD_PHASES.items()}
        within.update(loop_intervals(engine_loop(window)))
        per_run.append((summary, window, scenario_metrics(summary, window, host), within))
    if not per_run:
        return None
    metrics = {}
    for key in METRICS:
        values = [v for *_, measured, _ in per_run if (v := measured[key]) is not None]
        spread_in = [s for *_, within in per_run if (s := within.get(key)) is not None]
        basis = ["interval" if key in LOOP_SHARES else "batches"] if spread_in else []
        metrics[key] = _metric(values, spread_in, basis)
    summary, window, *_ = per_run[0]  # py-spy's view: the first repeat's
    return ConfigScenario(
        metrics=metrics,
        requests=sum(s.requests for s, *_ in per_run),
        errors=sum(s.errors for s, *_ in per_run),
        roles=role_categories(window),
        engine_loop=engine_loop(window),
        gil=gil_rows(window),
        concurrency=summary.concurrency,
        context_tokens=summary.context_tokens,
    )


def _configuration(sweep: SweepDir, name: str) -> Configuration:
    steps = [s for s in sweep.info().steps if s.configuration == name]
    folders = [s.folder for s in steps if s.status in FINISHED]
    runs = load_config_runs(sweep, folders)
    names = list(dict.fromkeys(s.name for r in runs for s in r.summary.scenarios))
    found = {n: v for n in names if (v := _config_scenario(runs, n)) is not None}
    info = runs[0].info if runs else {}
    return Configuration(
        name=name,
        folders=folders,
        repeats=len(runs),
        failed=[s for s in steps if s.status not in FINISHED],
        scenarios=found,
        server=_convert(info.get("server"), ServerInfo),
        target=_convert(info.get("target"), TargetInfo),
    )


def _convert(raw: Any, kind: type[ServerInfo] | type[TargetInfo]) -> Any:
    return None if raw is None else msgspec.convert(raw, kind)


def _unit_is_points(key: str) -> bool:
    return METRICS[key].unit.startswith("%")


def analyse_sweep(sweep: SweepDir) -> SweepComparison:
    """The comparison, from sweep.json's plan and outcomes and each run directory; written
    into sweep.json as its `comparison` and returned."""
    info = sweep.info()
    configs = [_configuration(sweep, name) for name in info.configurations]
    base = next((c for c in configs if c.scenarios), None)
    deltas = []
    for other in configs:
        if base is None or other is base:
            continue
        for scenario, mine in other.scenarios.items():
            theirs = base.scenarios.get(scenario)
            if theirs is None:
                continue
            rows = [
                delta_row(
                    key,
                    theirs.metrics[key].value,
                    mine.metrics[key].value,
                    theirs.metrics[key].spread,
                    mine.metrics[key].spread,
                    in_points=_unit_is_points(key),
                )
                for key in METRICS
            ]
            deltas.append(SweepDelta(configuration=other.name, scenario=scenario, rows=rows))
    comparison = SweepComparison(
        baseline=base.name if base else None,
        configurations=configs,
        deltas=deltas,
        claims=claims(info, configs),
    )
    info.comparison = comparison
    sweep.write_info(info)
    return comparison
