"""The replay's agentic section of report.md: turns, sessions, concurrency, prefix cache."""

from __future__ import annotations

from typing import Any

from cputax.report.format import fraction, instant, ms, number, pct, table
from cputax.results.summary import Summary, TurnParts

PART_LABELS = {
    "think": "Think",
    "client": "Client build",
    "front_end": "Server front end",
    "engine": "Server engine",
}

HOW_TO_READ = """\
A turn runs from the agent's previous response to this response: **Think** is the
trace's wait (times --time-scale) plus timer lag; **Client build** synthesizes the
messages, builds and encodes the payload (client CPU); **Server front end** is sent ->
headers (template, tokenization, event-loop waits); **Server engine** is headers ->
stream closed (queue, prefill, decode, streaming). The critical path is the chain of
turns that ended the session last, through the sub-agent that finished last and its
parent's turns before the spawn; a sub-agent's spawn wait counts as Think. Agents
active at once are the study's "effective concurrency"; requests in flight are what
the server saw."""


def agentic_section(summary: Summary, info: dict[str, Any]) -> str | None:
    agentic = summary.agentic
    if agentic is None:
        return None
    replay = info.get("replay", {})
    turns = agentic.turns
    part_names = TurnParts.__struct_fields__  # the parts of a turn, in the analysis's order
    turn_share = turns.share_of_cycle_pct
    turn_rows = []
    for k in part_names:
        st = getattr(turns.ms, k)
        turn_rows.append(
            [
                PART_LABELS[k],
                ms(st.mean),
                ms(st.p50),
                ms(st.p99),
                pct(getattr(turn_share, k) if turn_share else None),
            ]
        )
    turn_rows.append(
        [
            "Turn cycle",
            ms(turns.cycle_ms.mean),
            ms(turns.cycle_ms.p50),
            ms(turns.cycle_ms.p99),
            "100%",
        ]
    )
    session_rows = []
    for s in agentic.sessions:
        path = s.critical_path
        share_pct = path.share_pct
        session_rows.append(
            [
                s.session,
                f"{s.requests - s.errors}/{s.requests}",
                str(s.subagents),
                f"{path.wall_s:,.1f}",
                " > ".join(path.chain),
                str(path.turns),
            ]
            + [pct(getattr(share_pct, k) if share_pct else None) for k in part_names]
        )
    conc = agentic.concurrency
    span = conc.timeline[-1].t_s if conc.timeline else None
    timeline_rows = [
        [
            instant(b.t_s, span),
            number(b.agents, 1),
            number(b.requests, 1),
            number(b.subagent_requests, 1),
        ]
        for b in conc.timeline
    ]
    cache = agentic.prefix_cache
    skipped, dropped = agentic.skipped_over_context, agentic.dropped_by_limit
    lines = [
        "## Agentic replay",
        "",
        f"- conversations: {len(replay.get('conversations', []))}, "
        f"at most {replay.get('users')} at once, "
        f"time scale {replay.get('time_scale')}; {turns.count} requests sent"
        + (f", {skipped} skipped over --max-context {replay.get('max_context')}" if skipped else "")
        + (f", {dropped} past --limit-requests {replay.get('limit_requests')}" if dropped else ""),
        f"- prompt text: {replay.get('blocks', 0):,} blocks of "
        f"{'/'.join(map(str, replay.get('block_sizes', [])))} "
        "tokens made in "
        f"{replay.get('prepare_s', 0):.1f} s before the clock started; a block is "
        f"{number(replay.get('server_block_tokens'))} tokens to the server's counter",
    ]
    for error in replay.get("trace_errors", []):
        lines.append(f"- not replayed: {error}")
    lines += [
        "",
        "### Where a turn's time goes (ms)",
        "",
        table(["Part", "mean", "p50", "p99", "share of mean cycle"], turn_rows),
        "",
        "### Sessions: critical path",
        "",
        table(
            ["Session", "OK/requests", "Sub-agents", "Wall s", "Critical path", "Turns on it"]
            + [f"{PART_LABELS[k]} %" for k in part_names],
            session_rows,
        ),
        "",
        "### Effective concurrency over time",
        "",
        f"Agents active: mean {conc.agents_mean:.1f}, max {conc.agents_max}; requests in "
        f"flight: mean {conc.requests_mean:.1f}, max {conc.requests_max} (sub-agents' "
        f"requests: max {conc.subagent_requests_max}).",
        "",
        table(
            ["from s", "agents active", "requests in flight", "of them sub-agents'"], timeline_rows
        ),
        "",
        "### Prefix-cache hit rate",
        "",
        table(
            [
                "trace file (all its requests)",
                "requests replayed (ideal cache)",
                "server (its counters)",
            ],
            [[fraction(cache.trace_file), fraction(cache.replayed_ideal), fraction(cache.server)]],
        ),
        "",
        HOW_TO_READ,
    ]
    return "\n".join(lines)
