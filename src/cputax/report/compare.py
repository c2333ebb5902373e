"""`cputax compare RUN_A RUN_B` rendered: the comparison (analysis.compare) as markdown. Every
figure and judgment here is analysis's (results.comparison); this module only writes them."""

from __future__ import annotations

from cputax.report.format import ms, number, pct, signed_pct, table
from cputax.results.comparison import Delta, RunComparison

__all__ = ["render_compare"]

LABELS = {
    "serialize": "Serialize",
    "http_overhead": "HTTP OH",
    "prefill": "Prefill",
    "decode": "Decode",
    "response_parse": "Parse",
    "total": "Total",
    "cpu_pct": "CPU%",
    "gpu_pct": "GPU%",
    "gpu_busy_pct": "GPU busy % (telemetry)",
    "gpu_stall_pct": "Stall % of wall (telemetry)",
}


def _is_pct(component: str) -> bool:
    return component.endswith("_pct")


def _value(component: str, v: float | None) -> str:
    return pct(v) if _is_pct(component) else ms(v)


def _delta(component: str, d: float | None) -> str:
    if d is None:
        return "absent"
    return f"{d:+.1f} pt" if _is_pct(component) else f"{d:+,.1f} ms"


def _note(row: Delta) -> str:
    if row.within_spread is None:
        return "no spread measure" if row.delta is not None else ""
    unit = " pt" if _is_pct(row.component) else " ms"
    side = "inside" if row.within_spread else "beyond"
    return f"{side} the run-to-run spread ({number(row.noise, 1)}{unit})"


def _quantiles(p50: float | None, p99: float | None) -> str:
    return "" if p50 is None and p99 is None else f" ({ms(p50)} / {ms(p99)})"


def render_compare(result: RunComparison) -> str:
    a, b = result.names
    parts = [f"# cputax comparison: {a} vs {b}", ""]
    for name, path, run in zip(result.names, result.runs, result.run_info, strict=True):
        parts.append(
            f"- **{name}**: `{path}` (model `{run.model}`, endpoint `{run.endpoint}`, "
            f"profile `{run.profile}`)"
        )
    parts += ["", "## CPU% per scenario (the study's comparison)", ""]
    rows = []
    for s in result.scenarios:
        cpu = next(r for r in s.components if r.component == "cpu_pct")
        rows.append([s.name, pct(cpu.a), pct(cpu.b), _delta("cpu_pct", cpu.delta), _note(cpu)])
    parts += [table(["Scenario", f"{a} CPU%", f"{b} CPU%", "Delta", "Note"], rows), ""]
    parts += [f"## Every component ({b} − {a}; ms are means, p50 / p99 in brackets)", ""]
    rows = []
    for s in result.scenarios:
        for r in s.components:
            c = r.component
            relative = "" if r.delta_pct is None else signed_pct(r.delta_pct)
            rows.append(
                [
                    s.name,
                    LABELS.get(c, c),
                    _value(c, r.a) + _quantiles(r.p50_a, r.p99_a),
                    _value(c, r.b) + _quantiles(r.p50_b, r.p99_b),
                    _delta(c, r.delta),
                    relative,
                    _note(r),
                ]
            )
    parts += [table(["Scenario", "Component", a, b, "Delta", "Delta %", "Note"], rows), ""]
    for only, label in ((result.only_in_a, a), (result.only_in_b, b)):
        if only:
            parts.append(f"- only in {label}: {', '.join(only)}")
    slices = f"{result.groups} consecutive slices" if result.groups else "consecutive slices"
    parts += [
        "",
        f"Spread: the range of a component over each run's closed-loop batches (or "
        f"{slices} of an open-loop scenario); a delta no larger than the larger of the two "
        "runs' spreads is inside it and is not a measured difference. CPU% and GPU% are "
        "the study's wall-time ratios.",
        "",
    ]
    return "\n".join(parts)
