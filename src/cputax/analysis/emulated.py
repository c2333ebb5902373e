"""The emulated GPU's truth (emulated-gpu.jsonl): per scenario, how busy it was exactly,
how well its steps kept to the timing model, and the bubbles between its steps while
requests were at the engine: the CPU tax on the GPU, with what the server's threads did
during them (py-spy categories, where the run has them).

The correlation (correlate.py) sees the same GPU through the `emulated` telemetry source,
binned at its resolution; this module reads the steps themselves, so the two check each
other.
"""

from __future__ import annotations

from bisect import bisect_right

from cputax.analysis.correlate import (
    CategorySpans,
    category_spans,
    category_split,
    merge,
    pending_states,
    request_phases,
    top_shares,
    without_emulated_step,
)
from cputax.emulation import StepRecord, read_steps
from cputax.records import RequestTable
from cputax.results.correlation import CorrelationResult, EmulatedGpu, Percentiles
from cputax.rundir import RunDir
from cputax.util import percentile

BUBBLE_SPLIT_TOP = 3  # the bubble split's parts the report names

__all__ = ["add_bubbles", "scenario_bubbles"]


def _stats_ms(values_ns: list[int]) -> Percentiles:
    ms = [v / 1e6 for v in values_ns]
    return Percentiles(
        p50=percentile(ms, 50) if ms else None, p99=percentile(ms, 99) if ms else None
    )


def scenario_bubbles(
    window: tuple[int, int],
    steps: list[StepRecord],
    states: list[tuple[int, int, str]],
    categories: CategorySpans,
) -> EmulatedGpu:
    """One window: busy % from the steps, the model's error, and the bubbles (the gaps between
    consecutive steps while at least one request was at the engine, in prefill or decode)."""
    w0, w1 = window
    wall = w1 - w0
    mine = [s for s in steps if s.t1_ns > w0 and s.t0_ns < w1]
    busy_ns = sum(min(s.t1_ns, w1) - max(s.t0_ns, w0) for s in mine)
    errors = [s.t1_ns - s.t0_ns - s.model_ns for s in mine if s.model_ns > 0]
    engine = merge((a, b) for a, b, state in states if state == "engine")
    starts = [a for a, _ in engine]
    bubbles: list[tuple[int, int]] = []
    for prev, nxt in zip(steps, steps[1:], strict=False):
        a, b = max(prev.t1_ns, w0), min(nxt.t0_ns, w1)
        if b <= a:
            continue
        i = max(0, bisect_right(starts, a) - 1)
        while i < len(engine) and engine[i][0] < b:
            x, y = max(a, engine[i][0]), min(b, engine[i][1])
            if y > x:
                bubbles.append((x, y))
            i += 1
    lengths = [b - a for a, b in bubbles]
    split, thread_s = category_split(merge(bubbles), categories)
    cpu = sum(s.cpu_ns for s in mine)
    return EmulatedGpu(
        steps=len(mine),
        busy_pct=100.0 * busy_ns / wall if wall else None,
        step_ms=_stats_ms([s.t1_ns - s.t0_ns for s in mine]),
        model_error_ms=_stats_ms(errors),
        model_error_ms_max=max(errors) / 1e6 if errors else None,
        # after the emulated GPU was done, until its thread ran again: the CPU side's lag
        wake_lag_ms=_stats_ms([s.woke_ns - s.t1_ns for s in mine if s.woke_ns]),
        step_cpu_pct=100.0 * cpu / busy_ns if busy_ns else None,
        bubbles=len(bubbles),
        bubble_ms=_stats_ms(lengths),
        bubble_s=sum(lengths) / 1e9,
        bubble_pct=100.0 * sum(lengths) / wall if wall else None,
        bubble_split=split,
        bubble_split_top=top_shares(split, BUBBLE_SPLIT_TOP),
        bubble_thread_s=thread_s,
    )


def add_bubbles(
    run: RunDir, table: RequestTable, correlation: CorrelationResult
) -> dict[str, float | None]:
    """For a run with an emulated GPU: `emulated_gpu` on each correlation scenario, and its
    bubble share by scenario name, for the summary's `gpu_bubble_pct` beside the study's
    CPU%. Empty (nothing added) for a run without one."""
    if not run.emulated_gpu.is_file():
        return {}
    steps = sorted((s for s, _ in read_steps(run.emulated_gpu)), key=lambda s: s.t0_ns)
    if not steps:
        return {}
    categories = without_emulated_step(category_spans(run)) if correlation.pyspy else {}
    windows = {w["scenario"]: w for w in run.read_windows() if not w.get("skipped")}
    bubbles: dict[str, float | None] = {}
    for scenario in correlation.scenarios:
        w = windows.get(scenario.name)
        if w is None:
            continue
        window = (w["start_ns"], w["end_ns"])
        states = pending_states(request_phases(table.of_scenario(scenario.name)).clip(*window))
        result = scenario_bubbles(window, steps, states, categories)
        scenario.emulated_gpu = result
        bubbles[scenario.name] = result.bubble_pct
    correlation.emulated_gpu = True
    return bubbles
