"""Decomposition and server-metric deltas on records and scrapes with known answers."""

import pytest

from cputax.analysis.decompose import (
    http_overhead_growth,
    percentile,
    phases,
    summarize_scenario,
)
from cputax.analysis.server_metrics import scenario_server_metrics
from cputax.prometheus import parse_metrics
from cputax.records import RequestRecord, RequestTable
from cputax.results.summary import PhaseTimes, ScenarioSummary

MS = 1_000_000


def record(
    start_ms: float, send=1.0, headers=10.0, first=40.0, last=100.0, end=101.0, ok=True, **kw
):
    """A request whose phases are known: serialize=send, http=headers-send, ..."""
    t0 = int(start_ms * MS)
    return RequestRecord(
        scenario="s",
        ok=ok,
        t_start=t0,
        t_sent=t0 + int(send * MS),
        t_headers=t0 + int(headers * MS),
        t_first_token=t0 + int(first * MS),
        t_last_token=t0 + int(last * MS),
        t_end=t0 + int(end * MS),
        parse_s=0.002,
        build_s=0.0005,
        prompt_tokens=kw.pop("prompt_tokens", 1000),
        output_tokens=64,
        output_tokens_source="usage",
        chunks=64,
        **kw,
    )


def phases_ms(r: RequestRecord) -> dict[str, float] | None:
    p = phases(RequestTable.from_records([r]))
    return {k: float(v[0]) for k, v in p.items()} if len(p["total"]) else None


def test_phases_of_one_request():
    p = phases_ms(record(5.0))
    assert p == pytest.approx(
        {
            "serialize": 1.0,
            "http_overhead": 9.0,
            "prefill": 30.0,
            "decode": 60.0,
            "response_parse": 2.0,
            "total": 101.0,
        }
    )


def test_failed_or_incomplete_requests_have_no_phases():
    assert phases_ms(record(0, ok=False)) is None
    r = record(0)
    r.t_first_token = None
    assert phases_ms(r) is None


def test_received_moments_are_the_kernels_where_stamped():
    # the loop saw headers 3 ms and the first token 5 ms after the kernel had them
    r = record(0)
    r.t_headers_kernel, r.t_first_token_kernel = r.t_headers - 3 * MS, r.t_first_token - 5 * MS
    p = phases_ms(r)
    assert p["http_overhead"] == pytest.approx(9.0 - 3.0)
    assert p["prefill"] == pytest.approx(30.0 - 5.0 + 3.0)
    assert p["decode"] == pytest.approx(
        60.0 + 5.0
    )  # no kernel stamp for the last token: the loop's
    s = summarize_scenario(
        {"name": "s", "concurrency": 1, "context_tokens": 1000}, RequestTable.from_records([r])
    )
    assert s.clock == "kernel"
    # each phase's mean as % of the mean total: the report's stacked bars draw these
    total = s.mean_ms.total
    assert s.mean_share_pct.http_overhead == pytest.approx(100 * 6.0 / total)
    assert s.mean_share_pct.decode == pytest.approx(100 * 65.0 / total)
    assert s.mean_share_pct.total is None
    assert s.client_lag_ms.first_token_p99 == pytest.approx(5.0)


def test_percentile_interpolates():
    assert percentile([1.0], 99) == 1.0
    assert percentile([0.0, 10.0], 50) == 5.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_summary_means_ratios_and_errors():
    recs = [
        record(0),
        record(0, headers=20.0, first=50.0),
        record(0, ok=False, error="HTTP 500: boom"),
    ]
    s = summarize_scenario(
        {"name": "s", "concurrency": 2, "context_tokens": 1000},
        RequestTable.from_records(recs),
        window={"start_ns": 0, "end_ns": 200 * MS},
    )
    assert (s.requests, s.errors, s.error_kinds) == (3, 1, {"HTTP 500": 1})
    assert s.mean_ms.http_overhead == pytest.approx(14.0)
    cpu = 1.0 + 14.0 + 2.0
    assert s.cpu_pct == pytest.approx(100 * cpu / 101.0)
    assert s.gpu_pct == pytest.approx(100 * (30.0 + 55.0) / 101.0)  # decode 60 and 50 ms
    assert s.prompt_tokens_mean == 1000 and not s.prompt_tokens_flagged
    assert s.client_cpu_ms.parse_per_chunk_us == pytest.approx(2000 / 64)
    assert s.throughput.requests_per_s == pytest.approx(2 / 0.2)
    # 2 ok requests of 101 ms each in a 200 ms window: ~1 in flight on average
    assert s.achieved_concurrency == pytest.approx(2 * 101 / 200)


def test_prompt_size_flag_beyond_two_percent():
    s = summarize_scenario(
        {"name": "s", "concurrency": 1, "context_tokens": 1000},
        RequestTable.from_records([record(0, prompt_tokens=1030)]),
    )
    assert s.prompt_tokens_flagged and s.prompt_tokens_off_pct == pytest.approx(3.0)
    s = summarize_scenario(
        {"name": "s", "concurrency": 1, "context_tokens": 1000},
        RequestTable.from_records([record(0, prompt_tokens=1015)]),
    )
    assert not s.prompt_tokens_flagged


def test_http_overhead_growth_is_relative_to_lowest_concurrency_per_context():
    def scen(name, conc, ctx, oh):
        return ScenarioSummary(
            name=name,
            concurrency=conc,
            context_tokens=ctx,
            mean_ms=PhaseTimes(http_overhead=oh),
            p99_ms=PhaseTimes(http_overhead=oh * 2),
        )

    rows = http_overhead_growth(
        [scen("c4", 4, 8000, 30.0), scen("c1", 1, 8000, 10.0), scen("x", 2, 500, 5.0)]
    )
    # the 500-token context has one concurrency level only: no growth to show
    assert [(r.context_tokens, r.concurrency, r.growth) for r in rows] == [
        (8000, 1, 1.0),
        (8000, 4, 3.0),
    ]


BEFORE = """\
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 1.0
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 10
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="m"} 10
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 100
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 5.0
"""
AFTER = """\
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_sum{engine="0",model_name="m"} 1.5
vllm:request_queue_time_seconds_sum{engine="1",model_name="m"} 0.5
vllm:request_queue_time_seconds_count{engine="0",model_name="m"} 15
vllm:request_queue_time_seconds_count{engine="1",model_name="m"} 5
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 3000
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 600
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 9.0
"""


def test_server_metric_deltas_sum_engines_and_absent_is_none():
    m = scenario_server_metrics(
        parse_metrics(BEFORE),
        parse_metrics(AFTER),
        requests=10,
        gauge_polls=[{"vllm:num_requests_running": 2.0}, {"vllm:num_requests_running": 6.0}],
    )
    # (1.5 + 0.5 - 1.0) s over (15 + 5 - 10) requests = 100 ms
    assert m["mean_ms"]["queue"] == pytest.approx(100.0)
    assert m["prefix_cache_hit_rate"] == pytest.approx(500 / 2000)
    assert m["api_server_cpu_s_per_request"] == pytest.approx(0.4)
    assert m["gauges"]["running"] == {"mean": 4.0, "max": 6.0}
    # not exported: absent, never zero
    assert m["mean_ms"]["prefill"] is None and m["gauges"]["waiting"] is None
    assert m["counters"]["preemptions"] is None
