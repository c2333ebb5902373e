"""The judgments and figures report/ used to make itself, now made by analysis and read
from the results: each on both sides of its threshold, and the report showing the field."""

from __future__ import annotations

import pytest

from cputax.analysis.agentic import agentic_summary
from cputax.analysis.analyse import node_clock, with_totals
from cputax.analysis.attribution import MIN_SHARE, columns, headline
from cputax.analysis.correlate import QUIET_PCT, host_usage, top_shares
from cputax.analysis.timeline import HostSeries, Interval
from cputax.records import NodeResults, RequestRecord, Results
from cputax.report.agentic import agentic_section
from cputax.report.format import instant
from cputax.report.nodes import nodes_section
from cputax.report.server_phases import server_phases_section
from cputax.report.telemetry import host_table
from cputax.results.attribution import ThreadRow
from cputax.results.correlation import Scenario, Share
from cputax.results.summary import (
    ScenarioServerPhases,
    ScenarioSummary,
    ServerPhasesRun,
    Summary,
)

S = 1_000_000_000
MS = 1_000_000
EPS = 1e-6


def test_top_shares_rank_cut_and_divide_by_the_whole():
    split = {"a": 1.0, "b": 3.0, "c": 0.5, "d": 0.5}
    assert top_shares(split, 2) == [Share(name="b", pct=60.0), Share(name="a", pct=20.0)]
    assert top_shares(split, 1, whole=10.0) == [Share(name="b", pct=30.0)]
    assert top_shares({"a": 0.0}, 3) == [] and top_shares(split, 3, whole=0.0) == []


def _host(cpu_pct_by_pid: dict[int, float]) -> HostSeries:
    host = HostSeries(cpus=4)
    for pid, pct in cpu_pct_by_pid.items():
        host.roles[pid], host.names[pid] = "server", f"p{pid}"
        host.cpu[pid] = [Interval(0, S, pct / 100 * S)]
    return host


def test_a_process_under_the_quiet_line_is_counted_not_listed():
    above, below = QUIET_PCT + 0.1, QUIET_PCT - 0.1
    usage = host_usage(_host({1: above, 2: below}), (0, S))
    quiet = {p.pid: p.quiet for p in usage.processes}
    assert quiet == {1: False, 2: True} and usage.quiet_below_pct == QUIET_PCT
    text = host_table([Scenario(name="s", wall_s=1.0, host=usage)])
    assert "p1 (1)" in text and "p2 (2)" not in text
    assert f"1 more, each under {QUIET_PCT:g}% of a core" in text


def _row(thread: str, categories: dict[str, float]) -> ThreadRow:
    return ThreadRow(process="server 1", thread=thread, samples=1000, categories=categories)


def test_a_category_gets_a_column_and_the_headline_from_min_share():
    rows = [
        _row("a", {"tokenize": MIN_SHARE + EPS, "schedule": MIN_SHARE - EPS, "idle": 0.9}),
        _row("b", {"http": 0.05, "other": 0.001}),
    ]
    assert columns(rows) == ["http", "tokenize", "other", "idle"]  # schedule: under the line
    best = headline(rows)
    assert (best.thread, best.category, best.share) == ("b", "http", 0.05)
    assert headline([_row("a", {"tokenize": MIN_SHARE - EPS, "idle": 0.99})]) is None
    assert headline([_row("a", {"tokenize": MIN_SHARE, "idle": 0.99})]) is not None


def test_a_node_clock_is_the_drivers_own_only_without_offset_and_error():
    own = node_clock({"converted": True, "offset_ns": 0, "error_ns": 0})
    far = node_clock(
        {
            "converted": True,
            "offset_ns": 0,
            "error_ns": 40_000,
            "node": "n",
            "drift_ppm": 1.5,
            "drift_error_ppm": 0.25,
            "start": {"offset_ns": 0},
        }
    )
    unconverted = node_clock({"converted": False, "error": "actor died"})
    assert own.same_machine and not far.same_machine and not unconverted.same_machine
    assert node_clock(None) is None and node_clock({}) is None
    nodes = {
        "a": NodeResults(clock=own),
        "b": NodeResults(clock=far),
        "c": NodeResults(clock=unconverted),
        "d": NodeResults(),
    }
    text = nodes_section(Results({}, Summary(), nodes=nodes))
    assert "the driver's own machine" in text
    assert "offset +0.000 ms to the driver, error bound ± 40 µs, drift +1.50 ± 0.25 ppm" in text
    assert "were not converted" in text and "The node agent stopped (actor died)" in text
    assert "no clock estimate" in text


def _turn(
    turn: int, ready_ms: float, sent_ms: float, headers_ms: float, end_ms: float
) -> RequestRecord:
    return RequestRecord(
        scenario="replay",
        ok=True,
        session="s1",
        turn=turn,
        t_start=int(ready_ms * MS),
        t_sent=int(sent_ms * MS),
        t_headers=int(headers_ms * MS),
        t_end=int(end_ms * MS),
        extra={"ready_ns": int(ready_ms * MS), "agent_start_ns": 0},
    )


def test_agentic_shares_and_the_replays_counts_are_analysis_figures():
    # turn 0: think 0, client 1, front end 2, engine 7 ms; turn 1: think 5, 1, 2, 12 ms
    records = [_turn(0, 0, 1, 3, 10), _turn(1, 15, 16, 18, 30)]
    replay = {
        "conversations": [
            {"skipped_over_context": 2, "dropped_by_limit": 1},
            {"skipped_over_context": 1},
        ]
    }
    agentic = agentic_summary(records, replay, None)
    cycle = agentic.turns.share_of_cycle_pct  # of the mean cycle, 15 ms
    assert (cycle.think, cycle.client, cycle.front_end, cycle.engine) == pytest.approx(
        (100 * 2.5 / 15, 100 * 1 / 15, 100 * 2 / 15, 100 * 9.5 / 15)
    )
    path = agentic.sessions[0].critical_path.share_pct  # of the session's 30 ms
    assert (path.think, path.engine) == pytest.approx((100 * 5 / 30, 100 * 19 / 30))
    assert (agentic.skipped_over_context, agentic.dropped_by_limit) == (3, 1)
    text = agentic_section(Summary(agentic=agentic), {"replay": {**replay, "max_context": 9}})
    assert "| Think | 2.5 | 2.5 | 5.0 | 16.7% |" in text
    assert "3 skipped over --max-context 9" in text and "1 past --limit-requests" in text


def test_a_timeline_instant_has_decimals_only_on_a_short_timeline():
    assert instant(1.234, 9.9) == "1.23" and instant(12.345, 10.0) == "12"
    assert instant(3.0, None) == "3"


def test_the_server_phases_totals_are_over_the_scenarios_with_records():
    per_scenario = {
        "a": ScenarioServerPhases(
            records=4, with_server=3, records_without_span=1, spans_without_record=2
        ),
        "b": ScenarioServerPhases(records=5, with_server=5, spans_without_record=1),
        "none": ScenarioServerPhases(records=0, spans_without_record=7),  # not joined at all
    }
    run = with_totals(
        ServerPhasesRun(source="otlp", spans_received=11, spans_matched=8), per_scenario
    )
    assert (run.records_without_span, run.spans_without_record) == (1, 3)
    assert with_totals(None, per_scenario) is None
    summary = Summary(
        server_phases=run,
        scenarios=[
            ScenarioSummary(name=name, server_phases=sp) for name, sp in per_scenario.items()
        ],
    )
    text = server_phases_section(summary)
    assert "records without a span 1; spans without a record 3 in the scenarios' windows" in text
