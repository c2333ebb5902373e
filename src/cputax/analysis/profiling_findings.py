"""What the py-spy shares mean, judged once here so the report only renders them: the engine
loop's wait for its workers against its real scheduling, the workers' wait for the next step,
the server's own instrumentation, the GIL held in idle frames, the cost of cputax's /metrics
scrapes; and the sampling overhead (`--pyspy-overhead`) over pairs of scenarios.

Both need figures of the summary (the engine's queue time, throughput, TTFT): analysis
hands them over as ScenarioFigures, one per scenario.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cputax.results.attribution import (
    AttributionResult,
    Finding,
    GilInIdleFrames,
    OverheadPair,
    OwnMetrics,
    SamplingOverhead,
    ScrapeCost,
    StepWait,
    ThreadRow,
    Window,
    WorkerWait,
)
from cputax.results.summary import ScenarioSummary
from cputax.workload.profiles import CONTROL_SUFFIX

__all__ = [
    "GIL_IDLE_SHARE",
    "OVERHEAD_BUDGET_PCT",
    "OWN_METRICS_SHARE",
    "QUEUE_WORTH_MS",
    "STEP_WAIT_SHARE",
    "WAIT_SHARE",
    "ScenarioFigures",
    "add_findings",
    "engine_findings",
    "sampling_overhead",
    "scenario_figures",
]

WAIT_SHARE = 0.2  # an engine loop waiting for its workers this much of its time: a finding
STEP_WAIT_SHARE = 0.05  # a worker waiting for the next step this much: the model had nothing
OWN_METRICS_SHARE = 0.005  # the server's own instrumentation, per thread, worth naming
GIL_IDLE_SHARE = 0.02  # GIL held in idle frames, points of the thread's time
QUEUE_WORTH_MS = 1.0  # the engine's mean queue time is said beside the wait from here
OVERHEAD_BUDGET_PCT = 3.0  # what py-spy may cost in throughput
SCHEDULING = ("schedule", "kv_cache", "prefix_hash")


@dataclass(frozen=True)
class ScenarioFigures:
    """What the findings need of one scenario's summary."""

    queue_ms: float | None = None  # the server's own mean queue time
    gauge_polls: int | None = None  # cputax's polls of /metrics during it
    output_tps: float | None = None  # output tokens/s
    ttft_ms: float | None = None  # serialize + HTTP overhead + prefill, means


def scenario_figures(scenario: ScenarioSummary) -> ScenarioFigures:
    """A summary's scenario figures (the one place the findings read the summary)."""
    server, mean = scenario.server, scenario.mean_ms
    ttft = None
    if mean.prefill is not None:
        ttft = (mean.serialize or 0.0) + (mean.http_overhead or 0.0) + mean.prefill
    return ScenarioFigures(
        queue_ms=server.mean_ms.get("queue") if server else None,
        gauge_polls=server.gauge_polls_total if server else None,
        output_tps=scenario.throughput.output_tokens_per_s if scenario.throughput else None,
        ttft_ms=ttft,
    )


def _sum(row: ThreadRow, *categories: str) -> float:
    return sum(row.categories.get(c, 0.0) for c in categories)


def engine_findings(window: Window, figures: ScenarioFigures | None = None) -> list[Finding]:
    """The findings of one window, in the order the report says them."""
    figures = figures or ScenarioFigures()
    out: list[Finding] = []
    queue = (
        figures.queue_ms
        if figures.queue_ms is not None and figures.queue_ms >= QUEUE_WORTH_MS
        else None
    )
    for row in window.threads:
        wait = _sum(row, "worker_wait")
        if wait >= WAIT_SHARE:
            out.append(
                WorkerWait(
                    process=row.process,
                    thread=row.thread,
                    wait=wait,
                    scheduling=_sum(row, *SCHEDULING),
                    queue_ms=queue,
                )
            )
        step = _sum(row, "step_wait")
        if step >= STEP_WAIT_SHARE:
            out.append(StepWait(process=row.process, thread=row.thread, share=step))
    own = [
        (row.process, row.thread, _sum(row, "metrics"))
        for row in window.threads
        if _sum(row, "metrics") >= OWN_METRICS_SHARE
    ]
    if own:
        out.append(OwnMetrics(threads=own))
    for row in window.threads:
        idle_held = (row.gil or 0.0) * (row.gil_in_idle_frames or 0.0)
        if idle_held >= GIL_IDLE_SHARE and row.gil_idle_frames:
            out.append(
                GilInIdleFrames(
                    process=row.process,
                    thread=row.thread,
                    gil=row.gil or 0.0,
                    in_idle=idle_held,
                    frames=[f for f, _ in row.gil_idle_frames[:2]],
                )
            )
    scrape_s = sum(_sum(row, "metrics_scrape") for row in window.threads) * (window.wall_s or 0.0)
    if scrape_s > 0 and figures.gauge_polls:
        out.append(
            ScrapeCost(
                polls=figures.gauge_polls,
                thread_s=scrape_s,
                per_poll_s=scrape_s / figures.gauge_polls,
            )
        )
    return out


def _pct_change(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else 100.0 * (a - b) / b


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def sampling_overhead(
    figures: Mapping[str, ScenarioFigures], windows: list[Window], cpus: int | None = None
) -> SamplingOverhead | None:
    """Sampled vs unsampled runs of the same scenarios (`figures` in the summary's order);
    None without a pair. The verdict is the mean of the per-pair differences: with the
    order alternating, drift and order effects cancel in it, not in a total weighted by the
    longest scenarios."""
    names = [n for n in figures if n + CONTROL_SUFFIX in figures]
    if not names:
        return None
    cpu = {w.name: (sum(p.pyspy_cpu_s or 0.0 for p in w.processes), w.wall_s) for w in windows}
    pairs = []
    for name in names:
        on, off = figures[name], figures[name + CONTROL_SUFFIX]
        cpu_s, wall = cpu.get(name, (None, None))
        core = 100 * cpu_s / wall if cpu_s and wall else None  # py-spy's CPU, % of one core
        pairs.append(
            OverheadPair(
                name=name,
                tps_on=on.output_tps,
                tps_off=off.output_tps,
                tps_change_pct=_pct_change(on.output_tps, off.output_tps),
                ttft_on_ms=on.ttft_ms,
                ttft_off_ms=off.ttft_ms,
                ttft_change_pct=_pct_change(on.ttft_ms, off.ttft_ms),
                pyspy_core_pct=core,
                pyspy_cores_pct=core / cpus if core is not None and cpus else None,
            )
        )
    tps = [p.tps_change_pct for p in pairs if p.tps_change_pct is not None]
    ttft = [p.ttft_change_pct for p in pairs if p.ttft_change_pct is not None]
    cores = [p.pyspy_core_pct for p in pairs if p.pyspy_core_pct is not None]
    return SamplingOverhead(
        pairs=pairs,
        budget_pct=OVERHEAD_BUDGET_PCT,
        cpus=cpus,
        tps_mean_pct=_mean(tps),
        tps_min_pct=min(tps, default=None),
        tps_max_pct=max(tps, default=None),
        ttft_mean_pct=_mean(ttft),
        pyspy_core_pct=_mean(cores),
        pairs_measured=len(tps),
    )


def add_findings(
    result: AttributionResult, figures: Mapping[str, ScenarioFigures], cpus: int | None = None
) -> None:
    """Each window's findings and the sampling overhead, onto `result`."""
    for window in result.windows:
        window.findings = engine_findings(window, figures.get(window.name))
    result.overhead = sampling_overhead(figures, result.windows, cpus)
