"""A sweep's comparison: per scenario and configuration, the measurements the study's claims
turn on, each delta against the baseline (the first configuration) marked inside or beyond
the run-to-run spread, as `cputax compare` does.

A configuration's value is the mean over its repeats. Its spread is the larger of the
within-run spread (the range over a run's batches, analysis.compare.spreads: phases and
CPU% only) and the range over its repeats; with one repeat and no batches a delta has no
spread measure and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cputax.analysis.claims import claims
from cputax.analysis.compare import delta_row, spreads
from cputax.results.attribution import AttributionResult, ThreadRow, Window
from cputax.results.correlation import CorrelationResult, HostUsage
from cputax.results.summary import ScenarioSummary
from cputax.rundir import SweepDir
from cputax.servers import IDLE, OTHER
from cputax.util import average

__all__ = ["METRICS", "analyse_sweep", "load_config_runs", "scenario_metrics"]

# metric -> (label, unit, the phase analysis.compare.spreads measures it by, if any)
METRICS: dict[str, tuple[str, str, str | None]] = {
    "http_overhead_ms": ("time to headers", "ms", "http_overhead"),
    "queue_ms": ("server queue", "ms", None),
    "prefill_ms": ("prefill (client)", "ms", "prefill"),
    "decode_ms": ("decode", "ms", "decode"),
    "ttft_ms": ("TTFT (client)", "ms", None),
    "itl_ms": ("time between tokens", "ms", None),
    "output_tokens_per_s": ("output tokens/s", "tok/s", None),
    "cpu_pct": ("CPU% (the study's)", "%", "cpu_pct"),
    "api_server_cpu_pct": ("API server CPU", "% of a core", None),
    "engine_core_cpu_pct": ("EngineCore CPU", "% of a core", None),
    "worker_cpu_pct": ("worker CPU", "% of a core", None),
    "prefix_hash_share": ("prefix hashing, share of EngineCore busy time", "%", None),
    "schedule_share": ("scheduling + KV cache, share of the engine loop", "%", None),
    "worker_wait_share": ("waiting for the model step, share of the engine loop", "%", None),
    # the emulated GPU (cputax.emulation): a request's whole time, and the GPU's bubbles
    "total_ms": ("request time (client)", "ms", None),
    "gpu_bubble_pct": ("emulated GPU idle while requests waited", "% of wall", None),
}
ROLES = ("api_server", "engine_core", "worker", "launcher")


def load_config_runs(sweep: SweepDir, folders: list[str]) -> list[dict[str, Any]]:
    """The finished run directories of one configuration, each as summary, attribution,
    correlation, run.json and requests (as a RequestTable)."""
    runs = []
    for folder in folders:
        run = sweep.run(folder)
        if not run.summary.exists():
            continue
        runs.append({"folder": folder, "summary": run.read_summary(), "info": run.info(),
                     "attribution": _optional(AttributionResult, run.attribution),
                     "correlation": _optional(CorrelationResult, run.correlation),
                     "table": run.read_request_table()})
    return runs


def _optional(kind: type[AttributionResult] | type[CorrelationResult],
              path: Path) -> AttributionResult | CorrelationResult | None:
    return kind.load(path) if path.exists() else None


def _window(run: dict[str, Any], name: str) -> Window | None:
    attribution: AttributionResult | None = run.get("attribution")
    return next((w for w in attribution.windows if w.name == name), None) if attribution else None


def _host(run: dict[str, Any], name: str) -> HostUsage | None:
    correlation: CorrelationResult | None = run.get("correlation")
    found = [s for s in correlation.scenarios if s.name == name] if correlation else []
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


def engine_loop(window: Window | None) -> dict[str, float] | None:
    """The engine loop thread's shares (vLLM: EngineCore's MainThread), None without one."""
    roles = _roles(window)
    rows = [r for r in _threads(window)
            if roles.get(r.pid) == "engine_core" and r.thread == "MainThread"]
    if not rows:
        return None
    cats = rows[0].categories
    return {"worker_wait": cats.get("worker_wait", 0.0),
            "schedule": cats.get("schedule", 0.0) + cats.get("kv_cache", 0.0),
            "ipc": cats.get("ipc", 0.0), "busy": rows[0].active or 0.0,
            "samples": rows[0].samples}


def _prefix_hash_share(window: Window | None) -> float | None:
    roles = _roles(window)
    rows = [r for r in _threads(window) if roles.get(r.pid) == "engine_core"]
    busy = sum(r.active or 0.0 for r in rows)
    if not rows or busy <= 0:
        return None
    return 100.0 * sum(r.categories.get("prefix_hash", 0.0) for r in rows) / busy


def gil_rows(window: Window | None) -> list[dict[str, Any]]:
    """Threads with GIL data (--pyspy-gil): held, estimated wait, held in idle frames."""
    roles = _roles(window)
    return [{"role": roles.get(r.pid, "process"), "process": r.process, "thread": r.thread,
             "busy": r.active, "held": r.gil, "wait": r.gil_wait,
             "in_idle_frames": r.gil_in_idle_frames, "idle_frames": r.gil_idle_frames}
            for r in _threads(window) if r.gil is not None]


def scenario_metrics(summary: ScenarioSummary, window: Window | None,
                     host: HostUsage | None) -> dict[str, float | None]:
    """One run's measurements of one scenario (METRICS)."""
    mean = summary.mean_ms
    server = summary.server.mean_ms if summary.server is not None else {}
    out_tokens = summary.output_tokens_mean
    ttft = (None if mean.prefill is None
            else (mean.serialize or 0.0) + (mean.http_overhead or 0.0) + mean.prefill)
    itl = (mean.decode / (out_tokens - 1)
           if mean.decode is not None and out_tokens and out_tokens > 1 else None)
    values: dict[str, float | None] = {
        "http_overhead_ms": mean.http_overhead, "queue_ms": server.get("queue"),
        "prefill_ms": mean.prefill, "decode_ms": mean.decode, "ttft_ms": ttft, "itl_ms": itl,
        "output_tokens_per_s": (summary.throughput.output_tokens_per_s
                                if summary.throughput else None),
        "cpu_pct": summary.cpu_pct, "prefix_hash_share": _prefix_hash_share(window),
        "total_ms": mean.total, "gpu_bubble_pct": summary.gpu_bubble_pct,
    }
    loop = engine_loop(window)
    values["schedule_share"] = None if loop is None else 100.0 * loop["schedule"]
    values["worker_wait_share"] = None if loop is None else 100.0 * loop["worker_wait"]
    roles = _roles(window)
    for role in ("api_server", "engine_core", "worker"):
        procs = [p for p in (host.processes if host else [])
                 if (roles.get(p.pid) or p.server_role) == role]
        values[f"{role}_cpu_pct"] = sum(p.cpu_pct for p in procs) if procs else None
    return values


def _config_scenario(runs: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """A configuration's view of one scenario over its repeats: value, spread, the values."""
    per_run = []
    for run in runs:
        summary = run["summary"].scenario(name)
        if summary is None:
            continue
        window, host = _window(run, name), _host(run, name)
        within = spreads(next(s for s in run["info"]["scenarios"] if s["name"] == name),
                         run["table"].of_scenario(name))
        per_run.append((summary, window, host, within))
    if not per_run:
        return None
    metrics = {}
    for key, (_, _, phase) in METRICS.items():
        values = [v for summary, window, host, _ in per_run if (v := scenario_metrics(summary, window, host)[key]) is not None]
        spread_in = [w[phase] for *_, w in per_run if phase and w.get(phase) is not None]
        candidates = [max(values) - min(values)] if len(values) >= 2 else []
        candidates += spread_in
        metrics[key] = {"value": average(values), "spread": max(candidates) if candidates else None,
                        "values": values}
    summary, window, _, _ = per_run[0]
    return {"metrics": metrics, "requests": sum(s.requests for s, *_ in per_run),
            "errors": sum(s.errors for s, *_ in per_run), "roles": role_categories(window),
            "engine_loop": engine_loop(window), "gil": gil_rows(window),
            "concurrency": summary.concurrency, "context_tokens": summary.context_tokens}


def analyse_sweep(sweep: SweepDir) -> dict[str, Any]:
    """The comparison, from sweep.json's plan and outcomes and each run directory; written
    into sweep.json under "comparison" and returned."""
    info = sweep.info()
    configs = []
    for name in info["configurations"]:
        steps = [s for s in info["steps"] if s["configuration"] == name]
        folders = [s["folder"] for s in steps if s.get("status") in ("ok", "errors")]
        runs = load_config_runs(sweep, folders)
        scenario_names = list(dict.fromkeys(s.name for r in runs for s in r["summary"].scenarios))
        configs.append({"name": name, "folders": folders, "repeats": len(runs),
                        "failed": [s for s in steps if s.get("status") not in ("ok", "errors")],
                        "scenarios": {n: v for n in scenario_names if (v := _config_scenario(runs, n)) is not None},
                        "server": (runs[0]["info"].get("server") if runs else None),
                        "target": (runs[0]["info"].get("target") if runs else None)})
    base = next((c for c in configs if c["scenarios"]), None)
    deltas = []
    if base is not None:
        for other in configs:
            if other is base:
                continue
            for scenario, mine in other["scenarios"].items():
                theirs = base["scenarios"].get(scenario)
                if theirs is None:
                    continue
                rows = [delta_row(key, theirs["metrics"][key]["value"], mine["metrics"][key]["value"],
                                  theirs["metrics"][key]["spread"], mine["metrics"][key]["spread"]) for key in METRICS]
                deltas.append({"configuration": other["name"], "scenario": scenario, "rows": rows})
    comparison = {"baseline": base["name"] if base else None, "configurations": configs, "deltas": deltas,
                  "claims": claims(info, configs)}
    sweep.write_info({**info, "comparison": comparison})
    return comparison
