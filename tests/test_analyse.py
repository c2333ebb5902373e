"""analyse() and the report on a hand-made run directory, against figures computed by hand.

Two finished requests and one failed one in scenario "s", one skipped scenario "bad",
Prometheus scrapes before and after, three gauge polls (the last after the requests
ended). Every number below follows from those, as the comments show.
"""

from __future__ import annotations

import pytest

from cputax.analysis import analyse, failures
from cputax.cli import main
from cputax.records import JsonlWriter, RequestRecord, read_json, write_json
from cputax.report import render, write_report
from cputax.results.correlation import CorrelationResult
from cputax.results.format import to_builtins
from cputax.results.summary import GaugeStats, Skipped, Summary
from cputax.rundir import RunDir
from cputax.session import exit_status

MS = 1_000_000

BEFORE = """\
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 1.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 10
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 0
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 10.0
"""
AFTER = """\
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 1.3
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 12
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_sum{engine="0",model_name="m"} 0.1
vllm:request_prefill_time_seconds_count{engine="0",model_name="m"} 2
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 2100
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 500
# TYPE process_cpu_seconds counter
process_cpu_seconds_total 10.5
"""


def _record(index: int, ms: tuple[float, ...], **kw) -> RequestRecord:
    start, sent, headers, first, last, end = (None if t is None else int(t * MS) for t in ms)
    return RequestRecord(
        scenario="s",
        index=index,
        batch=0,
        t_start=start,
        t_sent=sent,
        t_headers=headers,
        t_first_token=first,
        t_last_token=last,
        t_end=end,
        **kw,
    )


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir.create(tmp_path / "run")
    run.write_info(
        {
            "endpoint": "http://127.0.0.1:1",
            "model": "m",
            "api": "chat",
            "profile": "p.toml",
            "prompt_counter": "server /tokenize",
            "host": {"cpus": 2},
            "server_metrics": True,
            "scenarios": [
                {"name": "s", "concurrency": 2, "context_tokens": 1000, "batches": 1},
                {"name": "bad", "concurrency": 2, "context_tokens": 1000, "batches": 1},
            ],
        }
    )
    with JsonlWriter(run.requests) as w:
        # phases ms: serialize 2, HTTP OH 10, prefill 40, decode 100, total 154; parse 1 ms
        w.write(
            _record(
                0,
                (0, 2, 12, 52, 152, 154),
                ok=True,
                status=200,
                build_s=0.0005,
                parse_s=0.001,
                prompt_tokens=1000,
                output_tokens=10,
                output_tokens_source="usage",
                chunks=10,
                target_prompt_tokens=1000,
            )
        )
        # serialize 4, HTTP OH 20, prefill 80, decode 200, total 306; parse 3 ms
        w.write(
            _record(
                1,
                (0, 4, 24, 104, 304, 306),
                ok=True,
                status=200,
                build_s=0.0015,
                parse_s=0.003,
                prompt_tokens=1010,
                output_tokens=10,
                output_tokens_source="usage",
                chunks=10,
                target_prompt_tokens=1000,
            )
        )
        w.write(_record(2, (0, 1, 3, None, None, 3), ok=False, status=500, error="HTTP 500: boom"))
    with JsonlWriter(run.windows) as w:
        w.write({"scenario": "s", "start_ns": 0, "end_ns": 400 * MS, "sent": 3})
        w.write(
            {
                "scenario": "bad",
                "start_ns": 400 * MS,
                "end_ns": 400 * MS,
                "sent": 0,
                "skipped": "warm-up request failed: HTTP 400: too long",
            }
        )
    run.scrape("s", "before").write_text(BEFORE)
    run.scrape("s", "after").write_text(AFTER)
    with JsonlWriter(run.gauges("s")) as w:
        for t, running in ((50, 2), (200, 1), (350, 0)):  # 350 ms: after every request ended
            w.write(
                {
                    "t_ns": t * MS,
                    "vllm:num_requests_running": running,
                    "vllm:num_requests_waiting": 0,
                }
            )
    return run


def test_decomposition_of_the_hand_made_run(run):
    s = analyse(run).summary.scenarios[0]
    assert (s.requests, s.errors, s.error_kinds) == (3, 1, {"HTTP 500": 1})
    assert to_builtins(s.mean_ms) == pytest.approx(
        {
            "serialize": 3.0,
            "http_overhead": 15.0,
            "prefill": 60.0,
            "decode": 150.0,
            "response_parse": 2.0,
            "total": 230.0,
        }
    )
    assert s.p99_ms.http_overhead == pytest.approx(10 + 0.99 * 10)  # linear between the two
    assert s.cpu_pct == pytest.approx(100 * (3 + 15 + 2) / 230)
    assert s.gpu_pct == pytest.approx(100 * (60 + 150) / 230)
    assert s.prompt_tokens_mean == 1005 and s.prompt_tokens_off_pct == pytest.approx(0.5)
    assert to_builtins(s.client_cpu_ms) == pytest.approx(
        {"build": 1.0, "parse_per_chunk_us": (100 + 300) / 2}
    )
    assert to_builtins(s.throughput) == pytest.approx(
        {"requests_per_s": 2 / 0.4, "output_tokens_per_s": 20 / 0.4, "chunks_per_s": 20 / 0.4}
    )
    assert s.achieved_concurrency == pytest.approx((154 + 306) / 400)


def test_server_side_of_the_hand_made_run(run):
    server = analyse(run).summary.scenarios[0].server
    assert server.mean_ms["queue"] == pytest.approx(1000 * 0.3 / 2)
    assert server.mean_ms["prefill"] == pytest.approx(50.0)
    assert server.mean_ms["decode"] is None  # not exported: absent, not zero
    assert server.prefix_cache_hit_rate == pytest.approx(500 / 2000)
    assert server.api_server_cpu_s_per_request == pytest.approx(0.5 / 2)  # the two that finished
    # the poll at 350 ms saw no request in flight and is left out
    assert server.gauges["running"] == GaugeStats(mean=1.5, max=2)
    assert (server.gauge_polls, server.gauge_polls_total) == (2, 3)


def test_skipped_and_failed_scenarios_fail_the_run(run, capsys):
    results = analyse(run)
    assert results.summary.skipped == [
        Skipped(name="bad", reason="warm-up request failed: HTTP 400: too long")
    ]
    assert failures(results.summary) == [
        "bad: skipped (warm-up request failed: HTTP 400: too long)",
        "s: 1 of 3 requests failed: HTTP 500 (1)",
    ]
    assert exit_status(results) == 1
    assert "2 scenario(s) had errors" in capsys.readouterr().err


def test_analysis_writes_what_it_derived(run):
    results = analyse(run)
    assert Summary.load(run.summary) == results.summary == run.read_summary()
    assert CorrelationResult.load(run.correlation) == results.correlation
    assert [s.name for s in results.correlation.scenarios] == ["s"]  # "bad" never ran
    assert not run.attribution.exists() and results.attribution is None  # no py-spy in this run


def test_report_renders_the_hand_computed_figures(run):
    results = analyse(run)
    text = render(results)
    assert (
        "| s | 2 | 1,000 → 1,005 | 15.0 (15.0 / 19.9) | 60.0 (60.0 / 79.6) | 150 (150 / 199) | "
        "230 (230 / 304) | 8.7% | 91.3% | 1/3 |"
    ) in text
    assert (
        "| s | 15.0 | 150 | 50.0 | absent | absent | absent | 60.0 | "
        "25.0% | 1.5 / 2 | 0.0 / 0 | 0.250 |" in text
    )
    assert "- **bad**: not measured: warm-up request failed: HTTP 400: too long." in text
    html = write_report(run, results)
    assert run.report_md.read_text() == text and html == run.report_html
    assert (run.plots / "decomposition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_clean_run_exits_zero(run):
    info = run.info()
    info["scenarios"] = info["scenarios"][:1]
    write_json(run.info_path, info)
    rows = [r for r in run.read_requests() if r.ok]
    windows = [w for w in run.read_windows() if not w.get("skipped")]
    run.requests.unlink()
    run.windows.unlink()
    with JsonlWriter(run.requests) as w:
        for r in rows:
            w.write(r)
    with JsonlWriter(run.windows) as w:
        for window in windows:
            w.write(window)
    assert exit_status(analyse(run)) == 0


def test_a_scenario_past_the_calibrated_ceiling_is_noted(run):
    # 20 chunks in the 400 ms window: 50 chunks/s; the stored ceiling says 40, 80% of it is 32
    run.update_info(
        client_ceiling={"max_chunks_per_s": 40, "share": 0.8, "cpus": 2, "cpu_model": "x"}
    )
    results = analyse(run)
    s = results.summary.scenarios[0]
    assert s.throughput.chunks_per_s == pytest.approx(20 / 0.4) and s.past_client_ceiling is True
    assert "- **s**: 50 chunks/s, past 80% of what this machine's client took in" in render(results)
    run.update_info(
        client_ceiling={"max_chunks_per_s": 1000, "share": 0.8, "cpus": 2, "cpu_model": "x"}
    )
    assert analyse(run).summary.scenarios[0].past_client_ceiling is False


def test_a_wall_clock_set_mid_run_is_noted(run):
    assert analyse(run).summary.clock_steps == 0 and "**clock**" not in render(analyse(run))
    # once in this process's client, twice in a sharded scenario's shards
    run.update_info(stamps={"kernel": True, "conversion_error_ns": 50, "clock_steps": 1})
    windows = run.read_windows()
    windows[0]["clock_steps"] = 2
    run.windows.unlink()
    with JsonlWriter(run.windows) as w:
        for window in windows:
            w.write(window)
    results = analyse(run)
    assert results.summary.clock_steps == 3
    assert "- **clock**: the wall clock was set 3 time(s) during the run" in render(results)


def test_report_reads_a_version_1_summary_and_rebuilds_it(run, capsys):
    analyse(run)
    old = read_json(run.summary)
    for key in ("format_version", "findings", "in_short"):  # what version 2 added
        del old[key]
    write_json(run.summary, old)
    assert Summary.load(run.summary).scenarios[0].requests == 3  # version 1 reads as it is
    assert main(["report", str(run.path)]) == 0
    assert read_json(run.summary)["format_version"] == 2


def test_report_refuses_an_unknown_summary_version_in_one_line(run, capsys):
    write_json(run.summary, {"format_version": 99, "scenarios": []})
    assert main(["report", str(run.path)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "format version 99" in err and "reads 1, 2" in err
    assert f"cputax report {run.path}" in err  # how to rebuild it
    assert read_json(run.summary) == {"format_version": 99, "scenarios": []}  # left as it was
    assert not run.report_md.exists()
