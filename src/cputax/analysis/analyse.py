"""analyse(run): everything derived from a run directory, computed once and written through RunDir.

Every stage reads only what the one before it wrote, so this rebuilds summary.json,
pyspy/attribution.json and correlation.json after a crash from the recorded files
(requests.jsonl, windows.jsonl, metrics/, telemetry.jsonl, pyspy/); the report then
renders the Results it returns and computes nothing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cputax.analysis.agentic import agentic_summary
from cputax.analysis.attribution import attribute_run
from cputax.analysis.correlate import correlate_run
from cputax.analysis.decompose import http_overhead_growth, summarize_scenario
from cputax.analysis.emulated import add_bubbles
from cputax.analysis.invariants import failure_line, schedule_lag, verdict, withhold
from cputax.analysis.profiling_findings import add_findings, scenario_figures
from cputax.analysis.server_metrics import run_scenario_metrics
from cputax.analysis.server_phases import server_phases
from cputax.analysis.timeline import host_series, read_telemetry
from cputax.records import NodeResults, RequestTable, Results
from cputax.results.attribution import AttributionResult
from cputax.rundir import RunDir

SUMMARY_RUN_KEYS = ("endpoint", "model", "profile", "prompt_counter", "host")


def summarize_run(run: RunDir, info: dict[str, Any], table: RequestTable) -> dict[str, Any]:
    """summary.json: per scenario the decomposition and the server's own metrics; with a
    replay, the agentic metrics."""
    windows = {w["scenario"]: w for w in run.read_windows()}
    skipped = [{"name": name, "reason": w["skipped"]} for name, w in windows.items() if w.get("skipped")]
    summaries = []
    for scenario in info["scenarios"]:
        mine = table.of_scenario(scenario["name"])
        if not len(mine):
            continue
        ended = ~np.isnan(mine["t_end"])
        sent = np.where(np.isnan(mine["t_sent"]), mine["t_start"], mine["t_sent"])
        server = run_scenario_metrics(run, scenario["name"], int(mine.ok.sum()), (sent[ended], mine["t_end"][ended]))
        summaries.append(summarize_scenario(scenario, mine, windows.get(scenario["name"]), server))
        summaries[-1]["past_client_ceiling"] = past_ceiling(summaries[-1], info.get("client_ceiling"))
        withhold(summaries[-1], verdict(mine))  # the run checks itself (analysis.invariants)
        if (lag := schedule_lag(mine)) is not None:
            summaries[-1]["schedule_lag_ms"] = lag
    summary: dict[str, Any] = {"run": {k: info[k] for k in SUMMARY_RUN_KEYS if k in info}, "scenarios": summaries}
    phases = server_phases(run, info, summaries)  # each request's own server phases, joined
    if phases is not None:
        summary["server_phases"] = phases
    if skipped:
        summary["skipped"] = skipped
    shards = [f"{name}: {line}" for name, w in windows.items() for line in w.get("shard_failures") or []]
    if shards:
        summary["shard_failures"] = shards
    # the wall clock set during the run (client.wire): in this process, and in each sharded scenario
    steps = (info.get("stamps") or {}).get("clock_steps", 0) + sum(w.get("clock_steps", 0) for w in windows.values())
    if steps:
        summary["clock_steps"] = steps
    interrupted = _interrupted(info, windows)
    if interrupted:
        summary["interrupted"] = interrupted
    if "replay" in info:
        server = (summaries[0].get("server") or {}) if summaries else {}
        summary["agentic"] = agentic_summary(table.replayed, info["replay"], server.get("prefix_cache_hit_rate"))
    return summary


def _interrupted(info: dict[str, Any], windows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """How a run stopped by SIGINT/SIGTERM ended (run.json's `interrupted`), with the scenarios
    whose window it cut short (windows.jsonl's); None for a run that ran to its end."""
    stopped = info.get("interrupted")
    cut = [name for name, w in windows.items() if w.get("interrupted")]
    if not stopped and not cut:
        return None
    return {**(stopped or {}), "scenarios": cut}


def interrupted_line(summary: dict[str, Any]) -> str | None:
    """The one line that says a run was interrupted, or None."""
    stopped = summary.get("interrupted")
    if not stopped:
        return None
    where = f" during {', '.join(stopped['scenarios'])}" if stopped.get("scenarios") else ""
    return (f"the run was interrupted by {stopped.get('signal', 'a signal')}{where}: later "
            "scenarios did not run, and requests in flight are records with error `cancelled`")


def past_ceiling(scenario: dict[str, Any], ceiling: dict[str, Any] | None) -> bool | None:
    """Whether the scenario's chunk rate came past the share of this machine's client ceiling
    (`cputax calibrate` stores it) where the client measures itself falling behind; None
    without a calibration."""
    rate = (scenario.get("throughput") or {}).get("chunks_per_s")
    if not ceiling or rate is None:
        return None
    return rate > ceiling.get("share", 0.8) * ceiling["max_chunks_per_s"]


def failures(summary: dict[str, Any]) -> list[str]:
    """One line per scenario that was skipped or had failed requests (empty: a clean run)."""
    lines = [f"{s['name']}: skipped ({s['reason']})" for s in summary.get("skipped", [])]
    stopped = interrupted_line(summary)
    if stopped:
        lines.insert(0, stopped)
    lines += summary.get("shard_failures", [])
    for s in summary["scenarios"]:
        if s["errors"]:
            kinds = ", ".join(f"{k} ({n})" for k, n in s["error_kinds"].items())
            lines.append(f"{s['name']}: {s['errors']} of {s['requests']} requests failed: {kinds}")
        if (line := failure_line(s)) is not None:
            lines.append(line)
    return lines


def analyse(run: RunDir) -> Results:
    """Summary, CPU attribution (py-spy) and GPU-idle correlation of a run directory, written
    to summary.json, pyspy/attribution.json and correlation.json and returned together."""
    info = run.info()
    table = run.read_request_table()
    summary = summarize_run(run, info, table)
    run.write(run.summary, summary)
    telemetry = read_telemetry(run.iter_telemetry())
    attribution = attribute_run(run, host_series(telemetry))
    if attribution is not None:
        _judge(attribution, summary, info)
        attribution.dump(run.attribution)
    correlation = correlate_run(run, info, table, telemetry)
    if add_bubbles(run, table, summary, correlation):  # the emulated GPU's own steps
        run.write(run.summary, summary)
    correlation.dump(run.correlation)
    return Results(info=info, summary=summary, attribution=attribution, correlation=correlation,
                   views=[p.as_posix() for p in run.views()],
                   growth=http_overhead_growth(summary["scenarios"]), name=run.path.name,
                   nodes={node.path.name: analyse_node(node, info, table) for node in run.nodes()})


def _judge(attribution: AttributionResult, summary: dict[str, Any], info: dict[str, Any]) -> None:
    """What the py-spy shares mean (analysis.profiling_findings), with the summary's figures."""
    figures = {s["name"]: scenario_figures(s) for s in summary["scenarios"]}
    add_findings(attribution, figures, (info.get("host") or {}).get("cpus"))


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
    return NodeResults(clock=node.read_optional(node.path / "clock.json"),
                       attribution=attribution, correlation=correlation)
