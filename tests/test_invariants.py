"""The run's self-checks (analysis.invariants) on records built to keep or break each one,
and what the summary, the exit status and the report make of a broken scenario."""

from __future__ import annotations

import msgspec
import pytest

from cputax.analysis.analyse import failures
from cputax.analysis.decompose import summarize_scenario
from cputax.analysis.findings import in_short
from cputax.analysis.invariants import Bounds, check, schedule_lag, verdict, withhold
from cputax.records import RequestRecord, RequestTable
from cputax.report.markdown import study_table
from cputax.report.terminal import summary_table
from cputax.results.summary import ScenarioSummary, Summary

MS = 1_000_000
SCENARIO = {"name": "s", "concurrency": 2, "context_tokens": 1000}


def record(t0_ms: float = 0.0, sent_ms: float = 0.1, **changes) -> RequestRecord:
    """A request that keeps every invariant: built in 0.05 ms of CPU, written in 0.02 ms,
    read by the loop 0.1 ms after the kernel had each moment. `sent_ms` after its start it
    is sent, and its answer comes that much later too."""
    t0 = int(t0_ms * MS) + int((sent_ms - 0.1) * MS)
    r = RequestRecord(
        scenario="s",
        ok=True,
        t_start=t0,
        t_sent=t0 + int(0.1 * MS),
        build_s=0.00005,
        write_s=0.00002,
        t_headers=t0 + 10 * MS,
        t_first_data=t0 + 10 * MS,
        t_first_token=t0 + 40 * MS,
        t_last_token=t0 + 100 * MS,
        t_end=t0 + 101 * MS,
        prompt_tokens=1000,
        output_tokens=32,
        output_tokens_source="usage",
        chunks=32,
    )
    for name in ("t_headers", "t_first_data", "t_first_token", "t_last_token"):
        setattr(r, name + "_kernel", getattr(r, name) - int(0.1 * MS))
    r.t_start = int(t0_ms * MS)
    for name, value in changes.items():
        setattr(r, name, value)
    return r


def broken(*records: RequestRecord, bounds: Bounds | None = None) -> dict[str, list[int]]:
    """Per cause, the indices of the records that break it."""
    masks = check(RequestTable.from_records(list(records)), bounds or Bounds())
    return {
        cause: [i for i, bad in enumerate(mask) if bad]
        for cause, mask in masks.items()
        if mask.any()
    }


def test_a_clean_record_keeps_every_invariant():
    assert broken(record(), record(5.0)) == {}
    v = verdict(RequestTable.from_records([record(), record(5.0)]))
    assert v.ok and v.checked == 2 and v.broken == 0


def test_a_request_stamped_sent_after_its_answer_is_caught():
    # issue 17's single_1k: the whole response stamped at 114.6 ms, t_sent 116.2 ms
    late = record(t_sent=int(116.2 * MS))
    for name in ("t_headers", "t_first_data", "t_first_token", "t_last_token"):
        setattr(late, name + "_kernel", int(114.6 * MS))
    found = broken(record(), late)
    assert found["sent_after_response"] == [1]
    assert found["negative_phase"] == [1]  # HTTP OH below zero, from the kernel's stamp


def causes(*records: RequestRecord) -> dict[str, int]:
    """The scenario verdict's causes (per-record stalls and the p99 bars)."""
    return verdict(RequestTable.from_records(list(records))).causes


def test_serialize_beyond_build_and_write_is_caught_within_its_bound():
    slow = record(sent_ms=25.0)  # 25 ms from start to sent, 0.05 ms of it the build
    assert broken(slow) == {"serialize_unexplained": [0]}
    assert broken(slow, bounds=Bounds(stall_ms=30.0)) == {}
    # a write that waited 24.9 ms for the server to read is after t_sent (its start): not
    # serialize's, and no break
    assert broken(record(write_s=0.0249)) == {}


def test_a_scenario_whose_p99_is_past_the_bar_is_caught():
    fine = [record(10.0 * i) for i in range(198)]
    blip = record(5000.0, sent_ms=6.0)  # one 6 ms wait in 200 requests: p99 fine
    assert causes(*fine, blip, record(6000.0)) == {}
    many = [record(7000.0 + 10 * i, sent_ms=6.0) for i in range(3)]
    assert causes(*fine[:97], *many) == {"serialize_p99": 3}  # 3 in 100: the p99 is 6 ms


def test_client_lag_from_both_clocks_is_caught():
    lagging = record()
    lagging.t_last_token = lagging.t_last_token_kernel + 25 * MS  # the loop 25 ms behind the kernel
    assert broken(record(), lagging) == {"client_lag": [1]}
    assert broken(lagging, bounds=Bounds(stall_ms=30.0)) == {}
    behind = record()
    behind.t_first_token = behind.t_first_token_kernel + 7 * MS
    assert broken(behind) == {} and causes(record(), behind) == {}  # one in a scenario: its worst
    assert causes(record(), behind, behind) == {"client_lag_p99": 2}


def test_an_open_loop_request_started_late_is_caught_and_its_lag_reported():
    on_time = record(t_intended=0)
    late = record(30.0, t_intended=int(2 * MS))  # meant for 2 ms, started at 30 ms
    assert broken(on_time, late) == {"schedule_lag": [1]}
    eight = record(10.0, t_intended=int(2 * MS))
    assert causes(on_time, eight) == {} and causes(on_time, eight, eight) == {"schedule_lag_p99": 2}
    lag = schedule_lag(RequestTable.from_records([on_time, late]))
    assert lag.requests == 2 and lag.max == pytest.approx(28.0)
    # latency from the intended start keeps the client's lateness: 28 ms more than from t_start
    assert lag.total_from_intended_p99 == pytest.approx(101.0 + 28.0, abs=0.3)
    assert schedule_lag(RequestTable.from_records([record()])) is None  # closed loop


def test_a_failed_request_has_no_phases_to_be_negative():
    failed = record(
        ok=False,
        t_first_token=None,
        t_last_token=None,
        t_first_token_kernel=None,
        t_last_token_kernel=None,
        t_end=int(5 * MS),
        error="HTTP 400: bad",
    )
    assert broken(failed) == {}


def _summary(*records: RequestRecord) -> ScenarioSummary:
    table = RequestTable.from_records(list(records))
    return withhold(summarize_scenario(SCENARIO, table), verdict(table))


def test_a_broken_scenario_is_marked_its_ratios_withheld_and_the_run_fails():
    clean = _summary(record(), record(5.0))
    assert clean.invariants.ok and clean.cpu_pct is not None and clean.withheld is None
    bad = _summary(record(), record(5.0, sent_ms=30.0))
    assert bad.invariants.causes == {"serialize_unexplained": 1}
    assert bad.cpu_pct is None and bad.gpu_pct is None
    assert "1 of 2 requests" in bad.withheld
    lines = failures(Summary(scenarios=[clean, bad]))
    assert (
        len(lines) == 1
        and lines[0].startswith("s: 1 of 2 requests break")
        and "withheld" in lines[0]
    )


def test_every_table_marks_a_broken_scenario():
    bad = _summary(record(), record(5.0, sent_ms=30.0))
    clean = msgspec.structs.replace(_summary(record()), name="fine")
    md = study_table([clean, bad])
    row = next(line for line in md.splitlines() if line.startswith("| s "))
    assert "⚠ 1/2 invalid" in row and "withheld" in row and "%" not in row.split("|")[-4]
    assert "withheld" not in next(line for line in md.splitlines() if line.startswith("| fine"))
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(summary_table([clean, bad]))
    assert "withheld" in console.export_text()
    short = in_short([clean, bad], {}, None, None)
    assert "break the run's invariants" in short
