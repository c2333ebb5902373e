"""`cputax extrapolate` rendered: the fit and the users x sub-agents table as markdown."""

from __future__ import annotations

from pathlib import Path

from cputax.report.format import number
from cputax.results.extrapolation import Extrapolation

__all__ = ["render"]


def render(result: Extrapolation, run_dir: Path) -> str:
    m, p = result.model, result.model.params
    ctx = result.context_tokens
    shape = "S = s1*n (one prompt size measured)" if p.proportional_to_tokens else "S = s0 + s1*n"
    lines = [
        f"# cputax extrapolation from `{run_dir}`",
        "",
        f"Model of the front end (time to headers): a batch of c requests queued on one thread, "
        f"`{m.formula}`, {shape}. Chosen: **{m.name}** (leave-one-out error: queue "
        f"{number(m.loo_rms_pct.queue, 1)}%, with contention "
        f"{number(m.loo_rms_pct.queue_contention, 1)}% at q = {m.alternative_q:.2f}; absent = "
        "too few scenarios).",
        "",
        f"- L = {p.L_ms:.2f} ms, s0 = {p.s0_ms:.2f} ms, s1 = {p.s1_us_per_token:.3f} µs/token, "
        f"q = {p.q:.2f}: the front end spends {p.service_ms_at_context:.1f} ms per "
        f"{ctx:,}-token request",
        f"- fit error over the measured scenarios: RMS {m.fit_rms_pct:.1f}%, max "
        f"{m.fit_max_pct:.1f}% (HTTP OH); CPU% off by {number(result.cpu_fit_rms_points, 2)} "
        "points RMS",
        f"- client CPU (serialize + parse) ms = {result.client_ms}; the rest of a request "
        f"(prefill, decode, stream end) ms = {result.rest_ms} (n = prompt tokens, c = "
        "concurrency)",
        "",
        "| Scenario | Conc | Prompt tok | HTTP OH ms | fitted | CPU% | fitted |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {q.name} | {q.concurrency} | {q.prompt_tokens:,.0f} | "
        f"{q.http_overhead_ms:,.1f} | {q.fitted_ms:,.1f} | {q.cpu_pct:.1f}% | "
        f"{q.fitted_cpu_pct:.1f}% |"
        for q in result.points
    ]
    lines += [
        "",
        f"## Users x sub-agents at {ctx:,} prompt tokens (largest measured concurrency: "
        f"{result.max_measured_concurrency})",
        "",
        f"| Users | Sub-agents/user | Effective conc | Est. CPU% | Est. HTTP OH ({ctx // 1000}K) |",
        "|---|---|---|---|---|",
    ]
    for r in result.table:
        mark = " ⚠" if r.beyond else ("" if not r.measured_range else " (within measured)")
        lines.append(
            f"| {r.users} | {r.subagents} | {r.concurrency}{mark} | {r.cpu_pct:.1f}% | "
            f"{r.http_overhead_ms:,.0f} ms |"
        )
    lines += [""] + [f"- {w}" for w in result.warnings]
    lines += [f"- left out: {x}" for x in result.left_out]
    return "\n".join(lines).rstrip() + "\n"
