"""What a replay's sessions spent their time on, beyond one request's phases.

Per turn (a request of one agent), from the previous response of the same agent to
this response: think (the trace's wait, scaled, plus timer lag), client prompt
building (synthesizing the messages, building and encoding the payload), server
front end (sent -> headers) and engine (headers -> stream closed). The turns of one
agent tile its time exactly, so a session's critical path (the chain of turns,
through the sub-agent that finished last and the parent turns before it was spawned)
splits into the same four parts.

Effective concurrency is the study's: agents (main or sub) active at once; requests
in flight are what the server saw. Prefix-cache hit rates: the trace file's own
(every request, unbounded cache), the same for the requests replayed, and the
server's (its counters), absent when the server does not export them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from cputax.records import RequestRecord
from cputax.results.summary import (
    Agentic,
    AgentSession,
    Concurrency,
    CriticalPath,
    PartTimes,
    PrefixCache,
    Stats,
    TimelineBucket,
    TurnParts,
    Turns,
)
from cputax.util import percentile

PARTS = ("think", "client", "front_end", "engine")
TIMELINE_BUCKETS = 12
MS = 1e-6


def turn_parts(r: RequestRecord, previous_end_ns: int) -> dict[str, float]:
    """One turn split into PARTS (ms); the parts add up to previous end -> this end."""
    ready = r.extra.get("ready_ns", r.t_start)
    end = r.t_end or r.t_start
    sent = r.t_sent or end
    headers = r.t_headers or end
    return {
        "think": (ready - previous_end_ns) * MS,
        "client": (sent - ready) * MS,
        "front_end": (headers - sent) * MS,
        "engine": (end - headers) * MS,
    }


def _agents(records: list[RequestRecord]) -> dict[tuple[str, str | None], list[RequestRecord]]:
    agents: dict[tuple[str, str | None], list[RequestRecord]] = defaultdict(list)
    for r in records:
        agents[(r.session or "", r.subagent)].append(r)
    for turns in agents.values():
        turns.sort(key=lambda r: r.turn or 0)
    return agents


def _agent_start(turns: list[RequestRecord]) -> int:
    return turns[0].extra.get("agent_start_ns", turns[0].t_start)


def _turns_with_parts(turns: list[RequestRecord]) -> list[tuple[RequestRecord, dict[str, float]]]:
    out, previous = [], _agent_start(turns)
    for r in turns:
        out.append((r, turn_parts(r, previous)))
        previous = r.t_end or r.t_start
    return out


def _shares(parts: dict[str, float], whole: float) -> PartTimes | None:
    """Each part as % of `whole` (None when the whole is nothing)."""
    return PartTimes(**{k: 100.0 * parts[k] / whole for k in PARTS}) if whole else None


def _critical_path(
    session: str, agents: dict[tuple[str, str | None], list[RequestRecord]]
) -> CriticalPath:
    """The chain that ended last: its agent's turns, the wait before it was spawned, the
    parent's turns up to the one it hangs off, and so on up to the main agent."""
    mine = {sub: turns for (s, sub), turns in agents.items() if s == session}
    last = max(mine, key=lambda sub: max(r.t_end or r.t_start for r in mine[sub]))
    end = max(r.t_end or r.t_start for r in mine[last])
    totals = dict.fromkeys(PARTS, 0.0)
    chain, agent, upto, turns_on_path = [], last, None, 0
    while agent in mine:
        turns = mine[agent]
        chain.append(agent or "main")
        for r, parts in _turns_with_parts(turns):
            if upto is not None and (r.turn or 0) > upto:
                break
            turns_on_path += 1
            for key in PARTS:
                totals[key] += parts[key]
        first = turns[0].extra
        if first.get("parent") is None:
            break
        parent = None if first["parent"] == "main" else first["parent"]
        upto = first.get("after_turn")
        anchor = next((r.t_end for r in mine.get(parent, []) if r.turn == upto), None)
        if anchor is not None:
            totals["think"] += (
                _agent_start(turns) - anchor
            ) * MS  # the trace's wait before the spawn
        else:
            totals["think"] += (_agent_start(turns) - _agent_start(mine.get(parent, turns))) * MS
        agent = parent
    start = _agent_start(mine.get(None) or mine[last])
    wall_s = (end - start) / 1e9
    return CriticalPath(
        agent=last or "main",
        chain=chain[::-1],
        turns=turns_on_path,
        wall_s=wall_s,
        ms=PartTimes(**totals),
        share_pct=_shares(totals, 1000 * wall_s),
    )


def _in_flight(intervals: list[tuple[int, int]], lo: int, hi: int) -> float:
    """Time-weighted mean number of intervals open over [lo, hi]."""
    if hi <= lo:
        return 0.0
    return sum(max(0, min(e, hi) - max(s, lo)) for s, e in intervals) / (hi - lo)


def _peak(intervals: list[tuple[int, int]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def _concurrency(
    records: list[RequestRecord], agents: dict[tuple[str, str | None], list[RequestRecord]]
) -> Concurrency:
    requests = [(r.t_start, r.t_end or r.t_start) for r in records]
    subs = [(r.t_start, r.t_end or r.t_start) for r in records if r.subagent is not None]
    active = [(_agent_start(t), max(r.t_end or r.t_start for r in t)) for t in agents.values()]
    lo = min(s for s, _ in active + requests)
    hi = max(e for _, e in active + requests)
    step = max(1, (hi - lo) // TIMELINE_BUCKETS)
    timeline = []
    for k in range(TIMELINE_BUCKETS):
        a, b = lo + k * step, (hi if k == TIMELINE_BUCKETS - 1 else lo + (k + 1) * step)
        timeline.append(
            TimelineBucket(
                t_s=(a - lo) / 1e9,
                agents=_in_flight(active, a, b),
                requests=_in_flight(requests, a, b),
                subagent_requests=_in_flight(subs, a, b),
            )
        )
    return Concurrency(
        agents_mean=_in_flight(active, lo, hi),
        agents_max=_peak(active),
        requests_mean=_in_flight(requests, lo, hi),
        requests_max=_peak(requests),
        subagent_requests_max=_peak(subs) if subs else 0,
        timeline=timeline,
    )


def _stats(values: list[float]) -> Stats:
    if not values:
        return Stats()
    return Stats(
        mean=sum(values) / len(values), p50=percentile(values, 50), p99=percentile(values, 99)
    )


def agentic_summary(
    records: list[RequestRecord], replay: dict[str, Any], server_hit_rate: float | None
) -> Agentic | None:
    """summary.json's `agentic` entry for a replay's records (None when there are none)."""
    records = [r for r in records if r.session is not None]
    if not records:
        return None
    agents = _agents(records)
    parts = [p for turns in agents.values() for _, p in _turns_with_parts(turns)]
    turns = {key: _stats([p[key] for p in parts]) for key in PARTS}
    cycle = _stats([sum(p.values()) for p in parts])
    means = {key: turns[key].mean or 0.0 for key in PARTS}
    sessions = []
    for session in sorted({r.session for r in records if r.session is not None}):
        mine = [r for r in records if r.session == session]
        sessions.append(
            AgentSession(
                session=session,
                requests=len(mine),
                errors=sum(not r.ok for r in mine),
                subagents=len({r.subagent for r in mine if r.subagent is not None}),
                critical_path=_critical_path(session, agents),
            )
        )
    convs = replay.get("conversations", [])
    file_tokens = sum(c.get("in_tokens", 0) for c in convs)
    file_rate = (
        (
            sum(
                c["trace_hit_rate"] * c["in_tokens"]
                for c in convs
                if c.get("trace_hit_rate") is not None
            )
            / file_tokens
        )
        if file_tokens
        else None
    )
    sent_in = sum(r.extra.get("trace_in", 0) for r in records)
    ideal = sum(r.extra.get("ideal_hit_tokens", 0) for r in records)
    return Agentic(
        turns=Turns(
            count=len(parts),
            ms=TurnParts(**turns),
            cycle_ms=cycle,
            share_of_cycle_pct=_shares(means, cycle.mean or 0.0),
        ),
        sessions=sessions,
        concurrency=_concurrency(records, agents),
        prefix_cache=PrefixCache(
            trace_file=file_rate,
            replayed_ideal=ideal / sent_in if sent_in else None,
            server=server_hit_rate,
        ),
        skipped_over_context=sum(c.get("skipped_over_context", 0) for c in convs),
        dropped_by_limit=sum(c.get("dropped_by_limit", 0) for c in convs),
    )
