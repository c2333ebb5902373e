"""The run's self-checks (analysis.invariants) on records built to keep or break each one,
and what the summary, the exit status and the report make of a broken scenario."""

from __future__ import annotations

import pytest

from cputax.analysis.analyse import failures
from cputax.analysis.decompose import summarize_scenario
from cputax.analysis.invariants import Bounds, check, schedule_lag, verdict, withhold
from cputax.records import RequestRecord, RequestTable
from cputax.report.markdown import in_short, study_table
from cputax.report.terminal import summary_table

MS = 1_000_000
SCENARIO = {"name": "s", "concurrency": 2, "context_tokens": 1000}


def record(t0_ms: float = 0.0, **changes) -> RequestRecord:
    """A request that keeps every invariant: built in 0.05 ms of CPU, written in 0.02 ms,
    read by the loop 0.1 ms after the kernel had each moment."""
    t0 = int(t0_ms * MS)
    r = RequestRecord(scenario="s", ok=True, t_start=t0, t_sent=t0 + int(0.1 * MS), build_s=0.00005,
                      write_s=0.00002, t_headers=t0 + 10 * MS, t_first_data=t0 + 10 * MS,
                      t_first_token=t0 + 40 * MS, t_last_token=t0 + 100 * MS, t_end=t0 + 101 * MS,
                      prompt_tokens=1000, output_tokens=32, output_tokens_source="usage", chunks=32)
    for name in ("t_headers", "t_first_data", "t_first_token", "t_last_token"):
        setattr(r, name + "_kernel", getattr(r, name) - int(0.1 * MS))
    for name, value in changes.items():
        setattr(r, name, value)
    return r


def broken(*records: RequestRecord, bounds: Bounds | None = None) -> dict[str, list[int]]:
    """Per cause, the indices of the records that break it."""
    masks = check(RequestTable.from_records(list(records)), bounds or Bounds())
    return {cause: [i for i, bad in enumerate(mask) if bad] for cause, mask in masks.items() if mask.any()}


def test_a_clean_record_keeps_every_invariant():
    assert broken(record(), record(5.0)) == {}
    v = verdict(RequestTable.from_records([record(), record(5.0)]))
    assert v["ok"] and v["checked"] == 2 and v["broken"] == 0


def test_a_request_stamped_sent_after_its_answer_is_caught():
    # issue 17's single_1k: the whole response stamped at 114.6 ms, t_sent 116.2 ms
    late = record(t_sent=int(116.2 * MS))
    for name in ("t_headers", "t_first_data", "t_first_token", "t_last_token"):
        setattr(late, name + "_kernel", int(114.6 * MS))
    found = broken(record(), late)
    assert found["sent_after_response"] == [1]
    assert found["negative_phase"] == [1]  # HTTP OH below zero, from the kernel's stamp


def test_serialize_beyond_build_and_write_is_caught_within_its_bound():
    slow = record(t_sent=int(6 * MS))  # 6 ms from start to sent, 0.07 ms of it build + write
    assert broken(slow) == {"serialize_unexplained": [0]}
    assert broken(slow, bounds=Bounds(serialize_slack_ms=10.0)) == {}
    written = record(t_sent=int(6 * MS), write_s=0.0059)  # the write itself took the time
    assert broken(written) == {}


def test_client_lag_from_both_clocks_is_caught():
    lagging = record()
    lagging.t_last_token = lagging.t_last_token_kernel + 7 * MS  # the loop 7 ms behind the kernel
    assert broken(record(), lagging) == {"client_lag": [1]}
    assert broken(lagging, bounds=Bounds(lag_ms=8.0)) == {}


def test_an_open_loop_request_started_late_is_caught_and_its_lag_reported():
    on_time = record(t_intended=0)
    late = record(10.0, t_intended=int(2 * MS))  # meant for 2 ms, started at 10 ms
    assert broken(on_time, late) == {"schedule_lag": [1]}
    lag = schedule_lag(RequestTable.from_records([on_time, late]))
    assert lag["requests"] == 2 and lag["max"] == pytest.approx(8.0)
    # latency from the intended start keeps the client's lateness: 8 ms more than from t_start
    assert lag["total_from_intended_p99"] == pytest.approx(101.0 + 8.0, abs=0.2)
    assert schedule_lag(RequestTable.from_records([record()])) is None  # closed loop


def test_a_failed_request_has_no_phases_to_be_negative():
    failed = record(ok=False, t_first_token=None, t_last_token=None, t_first_token_kernel=None,
                    t_last_token_kernel=None, t_end=int(5 * MS), error="HTTP 400: bad")
    assert broken(failed) == {}


def _summary(*records: RequestRecord) -> dict:
    table = RequestTable.from_records(list(records))
    s = summarize_scenario(SCENARIO, table)
    withhold(s, verdict(table))
    return s


def test_a_broken_scenario_is_marked_its_ratios_withheld_and_the_run_fails():
    clean = _summary(record(), record(5.0))
    assert clean["invariants"]["ok"] and clean["cpu_pct"] is not None and "withheld" not in clean
    bad = _summary(record(), record(5.0, t_sent=int(5 * MS + 9 * MS)))
    assert bad["invariants"]["causes"] == {"serialize_unexplained": 1}
    assert bad["cpu_pct"] is None and bad["gpu_pct"] is None
    assert "1 of 2 requests" in bad["withheld"]
    lines = failures({"scenarios": [clean, bad]})
    assert len(lines) == 1 and lines[0].startswith("s: 1 of 2 requests break") and "withheld" in lines[0]


def test_every_table_marks_a_broken_scenario():
    bad = _summary(record(), record(5.0, t_sent=int(5 * MS + 9 * MS)))
    clean = {**_summary(record()), "name": "fine"}
    md = study_table([clean, bad])
    row = next(line for line in md.splitlines() if line.startswith("| s "))
    assert "⚠ 1/2 invalid" in row and "withheld" in row and "%" not in row.split("|")[-4]
    assert "withheld" not in next(line for line in md.splitlines() if line.startswith("| fine"))
    from rich.console import Console

    console = Console(width=300, record=True)
    console.print(summary_table([clean, bad]))
    assert "withheld" in console.export_text()
    short = in_short({"scenarios": [clean, bad]}, {}, None, None)
    assert "break the run's invariants" in short
