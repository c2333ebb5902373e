"""`cputax compare` on fixture run directories whose differences are known by construction."""

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cputax.analysis.compare import GROUPS, compare_runs, delta_row, groups
from cputax.analysis.decompose import summarize_scenario
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord, RequestTable, write_json
from cputax.report.compare import render_compare
from cputax.results.comparison import RunComparison
from cputax.results.summary import RunInfo, Summary

DATA = Path(__file__).parent / "data"

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
            records.append(
                RequestRecord(
                    scenario="conc4",
                    index=b * conc + i,
                    batch=b,
                    ok=True,
                    t_start=t0,
                    t_sent=sent,
                    t_headers=headers,
                    t_first_token=first,
                    t_last_token=first + 500 * MS,
                    t_end=first + 501 * MS,
                    parse_s=0.001,
                )
            )
    path.mkdir()
    with JsonlWriter(path / "requests.jsonl") as w:
        for r in records:
            w.write(r)
    scenario = {"name": "conc4", "concurrency": conc, "context_tokens": 8000}
    Summary(
        run=RunInfo(model="m", endpoint="http://x"),
        scenarios=[summarize_scenario(scenario, RequestTable.from_records(records))],
    ).dump(path / "summary.json")
    if gpu:
        write_json(path / "correlation.json", {"scenarios": [{"name": "conc4", "gpu": gpu}]})
    return path


@pytest.fixture
def runs(tmp_path):
    a = make_run(
        tmp_path / "hbm", http_ms=50, prefill_jitter=10, gpu={"busy_pct": 90.0, "stall_pct": 4.0}
    )
    b = make_run(
        tmp_path / "lmcache",
        http_ms=80,
        prefill_jitter=10,
        gpu={"busy_pct": 85.0, "stall_pct": 7.0},
    )
    return a, b


def component(result, name):
    (s,) = result.scenarios
    return next(r for r in s.components if r.component == name)


def test_known_differences_and_spread(runs):
    result = compare_runs(*runs, names=("HBM", "LMCache"))
    http = component(result, "http_overhead")
    assert (http.a, http.b, http.delta) == (pytest.approx(50), pytest.approx(80), pytest.approx(30))
    assert http.delta_pct == pytest.approx(60.0) and http.within_spread is False
    prefill = component(result, "prefill")
    # batches 90/100/110 ms: a spread of 20 on both sides
    assert prefill.delta == pytest.approx(0) and prefill.spread_a == pytest.approx(20)
    assert prefill.within_spread is True and prefill.noise == pytest.approx(20)
    cpu = component(result, "cpu_pct")
    assert cpu.b > cpu.a and cpu.within_spread is False
    assert cpu.delta_pct is None  # a percentage changes in points, not relative
    assert component(result, "gpu_stall_pct").delta == pytest.approx(3.0)
    assert component(result, "http_overhead").p99_b == pytest.approx(80)
    assert result.groups == GROUPS


@pytest.mark.parametrize(
    ("b", "spread_b", "within"),
    [
        (12.0, 1.0, True),  # |delta| 2 equals the larger spread (2): inside
        (12.5, 1.0, False),  # 2.5 past it: beyond
        (7.5, 1.0, False),  # the same below A
        (12.0, 3.0, True),  # B's spread is the larger
        (12.0, None, True),  # one side without a spread: the other's counts
    ],
)
def test_a_delta_is_judged_against_the_larger_spread(b, spread_b, within):
    row = delta_row("prefill", 10.0, b, 2.0, spread_b)
    assert row.within_spread is within
    assert row.noise == max(s for s in (2.0, spread_b) if s is not None)
    assert row.delta_pct == pytest.approx(100 * (b - 10.0) / 10.0)


def test_a_delta_without_a_measure_is_not_judged():
    assert delta_row("prefill", 10.0, 20.0, None, None).within_spread is None
    assert delta_row("prefill", None, 20.0, 1.0, 1.0).within_spread is None
    assert delta_row("prefill", 0.0, 20.0, 1.0, 1.0).delta_pct is None  # nothing to be relative to
    assert delta_row("cpu_pct", 10.0, 20.0, 1.0, 1.0, in_points=True).delta_pct is None


def test_markdown_has_the_studys_table_and_notes(runs):
    md = render_compare(compare_runs(*runs, names=("HBM", "LMCache")))
    assert "| Scenario | HBM CPU% | LMCache CPU% | Delta | Note |" in md
    assert (
        "| conc4 | HTTP OH | 50.0 (50.0 / 50.0) | 80.0 (80.0 / 80.0) | +30.0 ms | "
        "+60.0% | beyond the run-to-run spread" in md
    )
    assert "| conc4 | Prefill |" in md and "inside the run-to-run spread (20.0 ms)" in md
    assert "Stall % of wall (telemetry)" in md
    assert f"or {GROUPS} consecutive slices of an open-loop scenario" in md


def test_json_round_trip_and_versions(runs, tmp_path):
    result = compare_runs(*runs, names=("HBM", "LMCache"))
    result.dump(tmp_path / "c.json")
    assert orjson.loads((tmp_path / "c.json").read_bytes())["format_version"] == 2
    again = RunComparison.load(tmp_path / "c.json")
    assert again == result
    assert render_compare(again) == render_compare(result)
    newer = orjson.loads((tmp_path / "c.json").read_bytes()) | {"format_version": 3}
    (tmp_path / "new.json").write_bytes(orjson.dumps(newer))
    with pytest.raises(CputaxError) as err:
        RunComparison.load(tmp_path / "new.json")
    assert "\n" not in str(err.value)
    assert "RunComparison format version 3; this cputax reads 1, 2" in str(err.value)


def test_the_json_of_a_cputax_before_versions_reads(runs):
    """data/compare-v1.json: `cputax compare --json` of these runs by the code before
    versions (no format_version, noise or groups)."""
    assert "format_version" not in orjson.loads((DATA / "compare-v1.json").read_bytes())
    old = RunComparison.load(DATA / "compare-v1.json")
    assert old.groups is None
    new = compare_runs(*runs, names=("HBM", "LMCache"))
    http_old, http_new = component(old, "http_overhead"), component(new, "http_overhead")
    assert (http_old.delta, http_old.within_spread) == (http_new.delta, http_new.within_spread)
    md = render_compare(old)
    assert "| conc4 | HTTP OH | 50.0 (50.0 / 50.0) | 80.0 (80.0 / 80.0) | +30.0 ms |" in md


def test_groups_for_the_spread():
    def rec(i, batch):
        return RequestRecord(
            scenario="s",
            ok=True,
            batch=batch,
            t_start=i,
            t_sent=i + 1,
            t_headers=i + 2,
            t_first_token=i + 3,
            t_last_token=i + 4,
            t_end=i + 5,
        )

    def table(records):
        return RequestTable.from_records(records)

    batched = groups(table([rec(i, i % 3) for i in range(9)]))
    assert [len(g) for g in batched] == [3, 3, 3]
    assert [g["t_start"].tolist() for g in batched][1] == [1, 4, 7]  # batch 1, in start order
    assert [len(g) for g in groups(table([rec(i, None) for i in range(10)]))] == [
        2,
        3,
        2,
        3,
    ]  # open loop: 4 slices
    assert groups(table([rec(i, None) for i in range(3)])) == []  # too few to measure a spread


def test_scenarios_present_in_one_run_only(runs, tmp_path):
    other = make_run(tmp_path / "other", http_ms=50, prefill_jitter=0)
    summary = orjson.loads((other / "summary.json").read_bytes())
    summary["scenarios"][0]["name"] = "renamed"
    write_json(other / "summary.json", summary)
    result = compare_runs(runs[0], other)
    assert result.scenarios == [] and result.only_in_a == ["conc4"]
    assert result.only_in_b == ["renamed"]
    with pytest.raises(CputaxError, match="no summary.json"):
        compare_runs(runs[0], tmp_path)


def test_cli_markdown_and_json(runs):
    cmd = [
        sys.executable,
        "-m",
        "cputax.cli",
        "compare",
        str(runs[0]),
        str(runs[1]),
        "--names",
        "HBM,LMCache",
    ]
    md = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    assert md.startswith("# cputax comparison: HBM vs LMCache")
    data = orjson.loads(
        subprocess.run(cmd + ["--json"], capture_output=True, timeout=60, check=True).stdout
    )
    assert data["names"] == ["HBM", "LMCache"] and data["scenarios"][0]["name"] == "conc4"
    assert data["format_version"] == 2
    bad = subprocess.run(cmd[:-1] + ["onlyone"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected two names" in bad.stderr
