"""`cputax compare RUN_A RUN_B` rendered: the comparison (analysis.compare) as markdown."""

from __future__ import annotations

from typing import Any

from cputax.report.format import ms, pct, table

LABELS = {"serialize": "Serialize", "http_overhead": "HTTP OH", "prefill": "Prefill", "decode": "Decode",
          "response_parse": "Parse", "total": "Total", "cpu_pct": "CPU%", "gpu_pct": "GPU%",
          "gpu_busy_pct": "GPU busy % (telemetry)", "gpu_stall_pct": "Stall % of wall (telemetry)"}


def _is_pct(component: str) -> bool:
    return component.endswith("_pct")


def _value(component: str, v: float | None) -> str:
    return pct(v) if _is_pct(component) else ms(v)


def _delta(component: str, d: float | None) -> str:
    if d is None:
        return "absent"
    return f"{d:+.1f} pt" if _is_pct(component) else f"{d:+,.1f} ms"


def _note(row: dict[str, Any]) -> str:
    if row["within_spread"] is None:
        return "no spread measure" if row["delta"] is not None else ""
    spread = max(s for s in (row["spread_a"], row["spread_b"]) if s is not None)
    unit = " pt" if _is_pct(row["component"]) else " ms"
    side = "inside" if row["within_spread"] else "beyond"
    return f"{side} the run-to-run spread ({spread:,.1f}{unit})"


def render_compare(result: dict[str, Any], groups: int) -> str:
    """`groups`: how many slices an open-loop scenario was cut into for the spread."""
    a, b = result["names"]
    parts = [f"# cputax comparison: {a} vs {b}", ""]
    for name, path, run in zip(result["names"], result["runs"], result["run_info"], strict=True):
        parts.append(f"- **{name}**: `{path}` (model `{run.get('model')}`, endpoint `{run.get('endpoint')}`, "
                     f"profile `{run.get('profile')}`)")
    parts += ["", "## CPU% per scenario (the study's comparison)", ""]
    rows = []
    for s in result["scenarios"]:
        cpu = next(r for r in s["components"] if r["component"] == "cpu_pct")
        rows.append([s["name"], pct(cpu["a"]), pct(cpu["b"]), _delta("cpu_pct", cpu["delta"]), _note(cpu)])
    parts += [table(["Scenario", f"{a} CPU%", f"{b} CPU%", "Delta", "Note"], rows), ""]
    parts += [f"## Every component ({b} − {a}; ms are means, p50 / p99 in brackets)", ""]
    rows = []
    for s in result["scenarios"]:
        for r in s["components"]:
            c = r["component"]
            qa = f" ({ms(r['p50_a'])} / {ms(r['p99_a'])})" if "p50_a" in r else ""
            qb = f" ({ms(r['p50_b'])} / {ms(r['p99_b'])})" if "p50_b" in r else ""
            relative = "" if r["delta_pct"] is None or _is_pct(c) else f"{r['delta_pct']:+.1f}%"
            rows.append([s["name"], LABELS.get(c, c), _value(c, r["a"]) + qa, _value(c, r["b"]) + qb,
                         _delta(c, r["delta"]), relative, _note(r)])
    parts += [table(["Scenario", "Component", a, b, "Delta", "Delta %", "Note"], rows), ""]
    for key, label in (("only_in_a", a), ("only_in_b", b)):
        if result[key]:
            parts.append(f"- only in {label}: {', '.join(result[key])}")
    parts += ["", f"Spread: the range of a component over each run's closed-loop batches (or {groups} consecutive "
              "slices of an open-loop scenario); a delta no larger than the larger of the two runs' spreads is "
              "inside it and is not a measured difference. CPU% and GPU% are the study's wall-time ratios.", ""]
    return "\n".join(parts)
