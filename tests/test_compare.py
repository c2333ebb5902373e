"""`cputax compare` on fixture run directories whose differences are known by construction."""

import subprocess
import sys

import orjson
import pytest

from cputax.analysis.compare import GROUPS, compare_runs, groups
from cputax.analysis.decompose import summarize_scenario
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord, RequestTable, write_json
from cputax.report.compare import render_compare
from cputax.results.summary import RunInfo, Summary

MS = 1_000_000


def make_run(path, http_ms, prefill_jitter, gpu=None, batches=3, conc=4):
    """A run directory with one closed-loop scenario "conc4": HTTP OH of `http_ms` per request,
    prefill 100 ms give or take `prefill_jitter` from batch to batch, decode 500 ms."""
    records = []
    for b in range(batches):
        prefill = 100 + prefill_jitter * (b - 1)
        for i in range(conc):
            t0 = (b * 1000 + i) * MS
            sent = t0 + 2 * MS
            headers = sent + int(http_ms * MS)
            first = headers + int(prefill * MS)
            records.append(RequestRecord(scenario="conc4", index=b * conc + i, batch=b, ok=True, t_start=t0,
                                         t_sent=sent, t_headers=headers, t_first_token=first,
                                         t_last_token=first + 500 * MS, t_end=first + 501 * MS, parse_s=0.001))
    path.mkdir()
    with JsonlWriter(path / "requests.jsonl") as w:
        for r in records:
            w.write(r)
    scenario = {"name": "conc4", "concurrency": conc, "context_tokens": 8000}
    Summary(run=RunInfo(model="m", endpoint="http://x"),
            scenarios=[summarize_scenario(scenario, RequestTable.from_records(records))]
            ).dump(path / "summary.json")
    if gpu:
        write_json(path / "correlation.json", {"scenarios": [{"name": "conc4", "gpu": gpu}]})
    return path


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path / "hbm", http_ms=50, prefill_jitter=10, gpu={"busy_pct": 90.0, "stall_pct": 4.0})
    b = make_run(tmp_path / "lmcache", http_ms=80, prefill_jitter=10, gpu={"busy_pct": 85.0, "stall_pct": 7.0})
    return a, b


def component(result, name):
    (s,) = result["scenarios"]
    return next(r for r in s["components"] if r["component"] == name)


def test_known_differences_and_spread(runs):
    result = compare_runs(*runs, names=("HBM", "LMCache"))
    http = component(result, "http_overhead")
    assert (http["a"], http["b"], http["delta"]) == (pytest.approx(50), pytest.approx(80), pytest.approx(30))
    assert http["delta_pct"] == pytest.approx(60.0) and http["within_spread"] is False
    prefill = component(result, "prefill")
    assert prefill["delta"] == pytest.approx(0) and prefill["spread_a"] == pytest.approx(20)  # batches 90/100/110 ms
    assert prefill["within_spread"] is True
    cpu = component(result, "cpu_pct")
    assert cpu["b"] > cpu["a"] and cpu["within_spread"] is False
    assert component(result, "gpu_stall_pct")["delta"] == pytest.approx(3.0)
    assert component(result, "http_overhead")["p99_b"] == pytest.approx(80)


def test_markdown_has_the_studys_table_and_notes(runs):
    md = render_compare(compare_runs(*runs, names=("HBM", "LMCache")), GROUPS)
    assert "| Scenario | HBM CPU% | LMCache CPU% | Delta | Note |" in md
    assert "| conc4 | HTTP OH | 50.0 (50.0 / 50.0) | 80.0 (80.0 / 80.0) | +30.0 ms | +60.0% | beyond the run-to-run spread" in md
    assert "| conc4 | Prefill |" in md and "inside the run-to-run spread (20.0 ms)" in md
    assert "Stall % of wall (telemetry)" in md


def test_groups_for_the_spread():
    def rec(i, batch):
        return RequestRecord(scenario="s", ok=True, batch=batch, t_start=i, t_sent=i + 1, t_headers=i + 2,
                             t_first_token=i + 3, t_last_token=i + 4, t_end=i + 5)
    def table(records):
        return RequestTable.from_records(records)

    batched = groups(table([rec(i, i % 3) for i in range(9)]))
    assert [len(g) for g in batched] == [3, 3, 3]
    assert [g["t_start"].tolist() for g in batched][1] == [1, 4, 7]  # batch 1, in start order
    assert [len(g) for g in groups(table([rec(i, None) for i in range(10)]))] == [2, 3, 2, 3]  # open loop: 4 slices
    assert groups(table([rec(i, None) for i in range(3)])) == []  # too few to measure a spread


def test_scenarios_present_in_one_run_only(runs, tmp_path):
    other = make_run(tmp_path / "other", http_ms=50, prefill_jitter=0)
    summary = orjson.loads((other / "summary.json").read_bytes())
    summary["scenarios"][0]["name"] = "renamed"
    write_json(other / "summary.json", summary)
    result = compare_runs(runs[0], other)
    assert result["scenarios"] == [] and result["only_in_a"] == ["conc4"] and result["only_in_b"] == ["renamed"]
    with pytest.raises(CputaxError, match="no summary.json"):
        compare_runs(runs[0], tmp_path)


def test_cli_markdown_and_json(runs):
    cmd = [sys.executable, "-m", "cputax.cli", "compare", str(runs[0]), str(runs[1]), "--names", "HBM,LMCache"]
    md = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert md.startswith("# cputax comparison: HBM vs LMCache")
    data = orjson.loads(subprocess.run(cmd + ["--json"], capture_output=True, timeout=60, check=True).stdout)
    assert data["names"] == ["HBM", "LMCache"] and data["scenarios"][0]["name"] == "conc4"
    bad = subprocess.run(cmd[:-1] + ["onlyone"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected two names" in bad.stderr
