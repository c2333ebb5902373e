"""analyse(run): everything derived from a run directory, computed once and written through RunDir.

Every stage reads only what the one before it wrote, so this rebuilds summary.json,
pyspy/attribution.json and correlation.json after a crash from the recorded files
(requests.jsonl, windows.jsonl, metrics/, telemetry.jsonl, pyspy/); the report then
renders the Results it returns and computes nothing.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from cputax.analysis.agentic import agentic_summary
from cputax.analysis.attribution import attribute_run
from cputax.analysis.correlate import correlate_run
from cputax.analysis.decompose import http_overhead_growth, summarize_scenario
from cputax.analysis.emulated import add_bubbles
from cputax.analysis.findings import in_short, scenario_findings
from cputax.analysis.invariants import failure_line, schedule_lag, verdict, withhold
from cputax.analysis.profiling_findings import add_findings, scenario_figures
from cputax.analysis.server_metrics import run_scenario_metrics
from cputax.analysis.server_phases import server_phases
from cputax.analysis.timeline import host_series, read_telemetry
from cputax.records import NodeResults, RequestTable, Results
from cputax.results.attribution import AttributionResult
from cputax.results.calibration import Ceiling
from cputax.results.nodes import NodeClock
from cputax.results.summary import (
    Interrupted,
    RunInfo,
    ScenarioServerPhases,
    ScenarioSummary,
    ServerMetrics,
    ServerPhasesRun,
    Skipped,
    Summary,
)
from cputax.rundir import RunDir

SUMMARY_RUN_KEYS = ("endpoint", "model", "profile", "prompt_counter", "host")


def summarize_run(
    run: RunDir,
    info: dict[str, Any],
    table: RequestTable,
    bubbles: dict[str, float | None] | None = None,
    correlation: dict[str, Any] | None = None,
    attribution: dict[str, Any] | None = None,
) -> Summary:
    """summary.json: per scenario the decomposition and the server's own metrics; with a
    replay, the agentic metrics; the findings drawn from them. `bubbles` are the emulated
    GPU's idle shares by scenario (analysis.emulated.add_bubbles); `correlation` and
    `attribution` feed the report's two opening lines."""
    windows = {w["scenario"]: w for w in run.read_windows()}
    skipped = [
        Skipped(name=name, reason=w["skipped"]) for name, w in windows.items() if w.get("skipped")
    ]
    summaries = []
    for scenario in info["scenarios"]:
        mine = table.of_scenario(scenario["name"])
        if not len(mine):
            continue
        ended = ~np.isnan(mine["t_end"])
        sent = np.where(np.isnan(mine["t_sent"]), mine["t_start"], mine["t_sent"])
        server = run_scenario_metrics(
            run, scenario["name"], int(mine.ok.sum()), (sent[ended], mine["t_end"][ended])
        )
        s = summarize_scenario(
            scenario,
            mine,
            windows.get(scenario["name"]),
            None if server is None else msgspec.convert(server, ServerMetrics),
        )
        s = withhold(s, verdict(mine))  # the run checks itself (analysis.invariants)
        summaries.append(
            msgspec.structs.replace(
                s,
                past_client_ceiling=past_ceiling(s, Ceiling.of_run(info)),
                schedule_lag_ms=schedule_lag(mine),
                gpu_bubble_pct=(bubbles or {}).get(s.name),
            )
        )
    # each request's own server phases, joined
    phases, per_scenario = server_phases(run, info, summaries)
    phases = with_totals(phases, per_scenario)
    summaries = [
        msgspec.structs.replace(s, server_phases=per_scenario.get(s.name)) for s in summaries
    ]
    shards = [
        f"{name}: {line}" for name, w in windows.items() for line in w.get("shard_failures") or []
    ]
    # the wall clock set during the run (client.wire): in this process, and in each sharded
    # scenario
    steps = (info.get("stamps") or {}).get("clock_steps", 0) + sum(
        w.get("clock_steps", 0) for w in windows.values()
    )
    agentic = None
    if "replay" in info:
        server = summaries[0].server if summaries else None
        agentic = agentic_summary(
            table.replayed, info["replay"], server.prefix_cache_hit_rate if server else None
        )
    return Summary(
        run=msgspec.convert({k: info[k] for k in SUMMARY_RUN_KEYS if k in info}, RunInfo),
        scenarios=summaries,
        server_phases=phases,
        skipped=skipped,
        shard_failures=shards,
        clock_steps=steps,
        interrupted=_interrupted(info, windows),
        agentic=agentic,
        findings=[f for s in summaries for f in scenario_findings(s, info)],
        in_short=in_short(summaries, info, correlation, attribution),
    )


def with_totals(
    run: ServerPhasesRun | None, per_scenario: dict[str, ScenarioServerPhases]
) -> ServerPhasesRun | None:
    """The run's line of the server phases with its totals over the scenarios that had
    records: records no span joined, spans no record joined."""
    if run is None:
        return None
    joined = [sp for sp in per_scenario.values() if sp.records]
    return msgspec.structs.replace(
        run,
        records_without_span=sum(sp.records_without_span for sp in joined),
        spans_without_record=sum(sp.spans_without_record for sp in joined),
    )


def _interrupted(info: dict[str, Any], windows: dict[str, dict[str, Any]]) -> Interrupted | None:
    """How a run stopped by SIGINT/SIGTERM ended (run.json's `interrupted`), with the scenarios
    whose window it cut short (windows.jsonl's); None for a run that ran to its end."""
    stopped = info.get("interrupted")
    cut = [name for name, w in windows.items() if w.get("interrupted")]
    if not stopped and not cut:
        return None
    signal = stopped.get("signal") if isinstance(stopped, dict) else None
    return Interrupted(signal=signal, scenarios=cut)


def interrupted_line(summary: Summary) -> str | None:
    """The one line that says a run was interrupted, or None."""
    stopped = summary.interrupted
    if not stopped:
        return None
    where = f" during {', '.join(stopped.scenarios)}" if stopped.scenarios else ""
    return (
        f"the run was interrupted by {stopped.signal or 'a signal'}{where}: later "
        "scenarios did not run, and requests in flight are records with error `cancelled`"
    )


def past_ceiling(scenario: ScenarioSummary, ceiling: Ceiling | None) -> bool | None:
    """Whether the scenario's chunk rate came past the share of this machine's client ceiling
    (`cputax calibrate` stores it) where the client measures itself falling behind; None
    without a calibration."""
    rate = scenario.throughput.chunks_per_s if scenario.throughput else None
    if ceiling is None or rate is None:
        return None
    return rate > ceiling.share * ceiling.max_chunks_per_s


def failures(summary: Summary) -> list[str]:
    """One line per scenario that was skipped or had failed requests (empty: a clean run)."""
    lines = [f"{s.name}: skipped ({s.reason})" for s in summary.skipped]
    stopped = interrupted_line(summary)
    if stopped:
        lines.insert(0, stopped)
    lines += summary.shard_failures
    for s in summary.scenarios:
        if s.errors:
            kinds = ", ".join(f"{k} ({n})" for k, n in s.error_kinds.items())
            lines.append(f"{s.name}: {s.errors} of {s.requests} requests failed: {kinds}")
        if (line := failure_line(s)) is not None:
            lines.append(line)
    return lines


def analyse(run: RunDir) -> Results:
    """Summary, CPU attribution (py-spy) and GPU-idle correlation of a run directory, written
    to summary.json, pyspy/attribution.json and correlation.json and returned together. The
    summary comes last: its findings read the other two."""
    info = run.info()
    table = run.read_request_table()
    telemetry = read_telemetry(run.iter_telemetry())
    attribution = attribute_run(run, host_series(telemetry))
    correlation = correlate_run(run, info, table, telemetry)
    bubbles = add_bubbles(run, table, correlation)  # the emulated GPU's own steps
    correlation.dump(run.correlation)
    summary = summarize_run(run, info, table, bubbles, correlation, attribution)
    run.write_summary(summary)
    if attribution is not None:  # what the py-spy shares mean, with the summary's figures
        _judge(attribution, summary, info)
        attribution.dump(run.attribution)
    return Results(
        info=info,
        summary=summary,
        attribution=attribution,
        correlation=correlation,
        views=[p.as_posix() for p in run.views()],
        growth=http_overhead_growth(summary.scenarios),
        name=run.path.name,
        nodes={node.path.name: analyse_node(node, info, table) for node in run.nodes()},
    )


def _judge(attribution: AttributionResult, summary: Summary, info: dict[str, Any]) -> None:
    """What the py-spy shares mean (analysis.profiling_findings), with the summary's figures."""
    figures = {s.name: scenario_figures(s) for s in summary.scenarios}
    add_findings(attribution, figures, (info.get("host") or {}).get("cpus"))


def node_clock(raw: dict[str, Any] | None) -> NodeClock | None:
    """clock.json as the report shows it; `same_machine` when the conversion had nothing to
    do (no offset, no error: the driver's own machine)."""
    if not raw:
        return None
    clock = NodeClock.from_json(raw)
    clock.same_machine = clock.converted and not clock.error_ns and not clock.offset_ns
    return clock


def analyse_node(node: RunDir, info: dict[str, Any], table: RequestTable) -> NodeResults:
    """A server node's folder of a Ray run (nodes/<node>/, its times already on the driver's
    clock): its CPU attribution and correlation, as for the run's own machine, written
    beside its files; the clock conversion they rest on (clock.json) goes with them."""
    telemetry = read_telemetry(node.iter_telemetry())
    attribution = attribute_run(node, host_series(telemetry))
    if attribution is not None:
        prefix = f"nodes/{node.path.name}/"
        for window in attribution.windows:
            for process in window.processes:  # links from the run's report, not the node's folder
                process.files = {k: prefix + v for k, v in process.files.items()}
        attribution.dump(node.attribution)
    correlation = correlate_run(node, info, table, telemetry)
    correlation.dump(node.correlation)
    return NodeResults(
        clock=node_clock(node.read_optional(node.path / "clock.json")),
        attribution=attribution,
        correlation=correlation,
    )
