"""The report's telemetry section: GPU stalls and their split, server CPU per process,
rendered from correlation.json's content (analysis.correlate)."""

from __future__ import annotations

from cputax.report.format import number, pct, table
from cputax.results.correlation import CorrelationResult, Scenario, Share

__all__ = ["host_table", "render_telemetry", "split_text", "stall_table"]

STATE_LABELS = (
    ("engine", "at the engine"),
    ("front_end", "in the front end"),
    ("client", "client side"),
)


def split_text(top: list[Share]) -> str:
    """The largest parts of a split (analysis.correlate.top_shares), "-" for none."""
    return ", ".join(f"{s.name} {s.pct:.0f}%" for s in top) or "-"


def stall_table(scenarios: list[Scenario]) -> str | None:
    rows = []
    for s in scenarios:
        g = s.gpu
        if not g:
            continue
        rows.append(
            [
                s.name,
                f"{s.wall_s:.1f}",
                pct(g.busy_pct),
                pct(g.idle_nothing_pending_pct),
                pct(g.stall_pct),
                f"{g.stalls} ({number(g.longest_stall_ms)})",
                *[number(g.stall_by_state.get(k, 0.0), 2) for k, _ in STATE_LABELS],
                split_text(g.stall_split_top),
                f"{g.resolution_ms:.0f} ms / ±{g.alignment_ms or 0:.1f} ms",
            ]
        )
    if not rows:
        return None
    header = [
        "Scenario",
        "Wall s",
        "GPU busy",
        "Idle, nothing in flight",
        "Stall % of wall",
        "Stalls (longest ms)",
    ]
    header += [f"Stall s {label}" for _, label in STATE_LABELS]
    header += ["Stall split (what the server did)", "Bin / clock ±"]
    return table(header, rows)


def host_table(scenarios: list[Scenario]) -> str | None:
    rows = []
    for s in scenarios:
        h = s.host
        if not h:
            continue
        quiet = [p for p in h.processes if p.quiet]  # analysis.correlate.QUIET_PCT
        for p in h.processes:
            if p.quiet:
                continue
            threads = ", ".join(f"{t.name}:{t.tid} {t.cpu_pct:.0f}%" for t in p.threads[:3]) or "-"
            role = p.role + (f": {p.server_role}" if p.server_role else "")
            rows.append(
                [
                    s.name,
                    f"{p.name} ({p.pid})",
                    role,
                    f"{p.cpu_pct:.1f}%",
                    f"{p.wait_pct:.1f}%",
                    f"{p.switches_per_s:,.0f}",
                    threads,
                    pct(h.system_busy_pct),
                ]
            )
        if quiet:
            rows.append(
                [
                    s.name,
                    f"{len(quiet)} more, each under {h.quiet_below_pct:g}% of a core",
                    "",
                    "",
                    "",
                    "",
                    "",
                    pct(h.system_busy_pct),
                ]
            )
    if not rows:
        return None
    return table(
        [
            "Scenario",
            "Process",
            "Role",
            "CPU (% of one core)",
            "Run-queue wait",
            "Scheduled in /s",
            "Busiest threads",
            "Machine CPU busy",
        ],
        rows,
    )


def _sources(corr: CorrelationResult) -> list[str]:
    lines = []
    gpu = next((s.gpu for s in corr.scenarios if s.gpu), None)
    if gpu:
        lines.append(
            f"- GPU ({gpu.backend}): busy = {gpu.source}; idle = busy below "
            f"{gpu.idle_below_pct:.0f}% in a {gpu.resolution_ms:.0f} ms bin, the "
            f"source's resolution ({gpu.resolution_basis}): no stall is shorter than "
            "one bin and each end is uncertain by up to one bin. Clock alignment ±"
            f"{gpu.alignment_ms or 0:.2f} ms (NVML stamps are wall clock; polled "
            "sources are on the run's monotonic clock)."
        )
    for note in corr.notes:
        lines.append(f"- {note}")
    host = corr.host_meta
    if host and host.interval_ms is not None:
        lines.append(
            f"- Host: every {host.interval_ms or 0:.0f} ms (median gap "
            f"{host.poll_gap_ms_p50 or 0:.0f} ms), thread CPU from "
            f"{host.thread_cpu or '?'}; CPU % is of one core, so a process can exceed "
            "100%; run-queue wait is the time its threads were ready to run but had "
            "no core, summed over threads."
        )
    if corr.pyspy:
        lines.append(
            "- Server CPU by category: from the py-spy timelines (on the run clock to "
            f"±{corr.pyspy_alignment_ms or 0:.0f} ms plus one sampling interval); a "
            "stall's server time is split in proportion to the busy thread time of "
            "each category during it."
        )
    else:
        lines.append(
            "- Server CPU by category: no py-spy data in this run, so the server's "
            "share of stall time is unattributed."
        )
    return lines


def render_telemetry(corr: CorrelationResult) -> str | None:
    stalls = stall_table(corr.scenarios)
    host = host_table(corr.scenarios)
    if not stalls and not host and not corr.notes:
        return None
    parts = ["## GPU and host telemetry", "", *_sources(corr), ""]
    parts += ["### GPU stalls: GPU idle while requests were in flight", ""]
    parts += [
        stalls if stalls else "_no GPU telemetry in this run: GPU busy and stall times are absent_",
        "",
    ]
    if host:
        parts += ["### Server CPU per process (host telemetry)", "", host, ""]
    return "\n".join(parts)
