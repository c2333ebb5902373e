"""summary.json as a typed Summary: its round trip, the files written before versions, one
line for a version this cputax does not read, and the findings analysis draws (each fires
past its threshold and not below it)."""

from __future__ import annotations

import msgspec
import orjson
import pytest

from cputax.analysis.analyse import past_ceiling
from cputax.analysis.findings import (
    HTTP_OH_OVER_QUEUE,
    SHARED_STAMPS_PCT,
    TTFT_DISAGREEMENT,
    in_short,
    scenario_findings,
)
from cputax.analysis.profiling_findings import WAIT_SHARE
from cputax.errors import CputaxError
from cputax.results.attribution import AttributionResult, ThreadRow, Window
from cputax.results.calibration import Ceiling
from cputax.results.summary import (
    ClientLag,
    Finding,
    GaugeStats,
    Interrupted,
    PhaseStats,
    PhaseTimes,
    RunInfo,
    ScenarioServerPhases,
    ScenarioSummary,
    ScheduleLag,
    ServerMetrics,
    ServerPhasesRun,
    ServerPhaseTimes,
    Skipped,
    Summary,
    Throughput,
    Verdict,
)


def _full() -> Summary:
    """A summary with every kind of part filled in."""
    scenario = ScenarioSummary(
        name="c8",
        concurrency=8,
        context_tokens=1000,
        requests=16,
        errors=1,
        error_kinds={"HTTP 500": 1},
        prompt_tokens_mean=1000.5,
        output_tokens_source=["usage"],
        mean_ms=PhaseTimes(
            serialize=0.5,
            http_overhead=7.0,
            prefill=20.0,
            decode=80.0,
            response_parse=0.1,
            total=108.0,
        ),
        p99_ms=PhaseTimes(http_overhead=13.5),
        client_lag_ms=ClientLag(p50=0.1, p99=0.4, max=1.0),
        server=ServerMetrics(
            mean_ms={"queue": 0.2, "itl": None},
            gauges={"running": GaugeStats(mean=4.0, max=8.0), "waiting": None},
        ),
        throughput=Throughput(chunks_per_s=120.0),
        cpu_pct=None,
        withheld="1 of 16 requests",
        invariants=Verdict(ok=False, checked=16, broken=1, causes={"client_lag": 1}),
        schedule_lag_ms=ScheduleLag(requests=16, p50=0.1, p99=0.3, max=0.4),
        server_phases=ScenarioServerPhases(
            records=16,
            phases_ms=ServerPhaseTimes(
                front_end=PhaseStats(n=3, mean=1.0, p50=1.0, p99=2.0, min=0.5)
            ),
        ),
    )
    return Summary(
        run=RunInfo(model="m", endpoint="http://x"),
        scenarios=[scenario],
        server_phases=ServerPhasesRun(source="otlp", findings=["c8: a finding"]),
        skipped=[Skipped(name="bad", reason="warm-up failed")],
        clock_steps=2,
        interrupted=Interrupted(signal="SIGINT", scenarios=["c8"]),
        findings=[Finding(kind="k", text="t", scenario="c8", threshold=1.5)],
        in_short="**In short**: x",
    )


def test_a_summary_reads_back_equal_and_writes_its_version(tmp_path):
    summary = _full()
    summary.dump(tmp_path / "summary.json")
    assert Summary.load(tmp_path / "summary.json") == summary
    raw = orjson.loads((tmp_path / "summary.json").read_bytes())
    assert raw["format_version"] == 2
    # the JSON keeps summary.json's shape: absent values are null, not left out
    assert raw["scenarios"][0]["cpu_pct"] is None and raw["scenarios"][0]["gpu_bubble_pct"] is None
    assert raw["scenarios"][0]["mean_ms"]["http_overhead"] == 7.0


V1 = {  # summary.json as cputax wrote it before format versions (a stub run's, abridged)
    "run": {
        "endpoint": "http://127.0.0.1:41393",
        "model": "cputax-stub",
        "host": {"cpus": 2, "python": "3.11.7"},
    },
    "scenarios": [
        {
            "name": "closed1_1k",
            "concurrency": 1,
            "context_tokens": 1000,
            "requests": 2,
            "errors": 0,
            "error_kinds": {},
            "prompt_tokens_flagged": False,
            "mean_ms": {
                "serialize": 27.6,
                "http_overhead": 4.38,
                "prefill": 0.0,
                "decode": 0.0,
                "response_parse": 0.14,
                "total": 228.4,
            },
            "client_lag_ms": {"p50": 195.9, "p99": 220.3, "max": 220.3, "first_token_p99": 219.8},
            "server": {
                "mean_ms": {"queue": 0.0, "itl": None},
                "histogram_counts": {"queue": 2.0},
                "gauges": {"running": None},
                "gauge_polls": 0,
                "gauge_polls_total": 1,
            },
            "invariants": {
                "ok": False,
                "checked": 2,
                "broken": 2,
                "causes": {"client_lag": 2},
                "bounds": {"tolerance_ms": 0.05, "p99_ms": 5.0, "stall_ms": 20.0},
            },
            "withheld": "2 of 2 requests break the run's invariants",
            "server_phases": {
                "records": 2,
                "phases_ms": {"http_in": None},
                "negative": {},
                "agreement": {"ttft": None, "prefill": None},
            },
        }
    ],
    "server_phases": {"source": "none", "findings": [], "note": "no spans"},
}


def test_a_summary_without_a_version_is_version_1_and_reads(tmp_path):
    (tmp_path / "summary.json").write_bytes(orjson.dumps(V1))
    summary = Summary.load(tmp_path / "summary.json")
    s = summary.scenarios[0]
    assert s.mean_ms.http_overhead == 4.38 and s.client_lag_ms.first_token_p99 == 219.8
    assert s.invariants.causes == {"client_lag": 2} and s.withheld.startswith("2 of 2")
    assert s.server.gauge_polls_total == 1 and s.server.mean_ms["queue"] == 0.0
    assert summary.server_phases.note == "no spans" and summary.findings == []
    assert summary.run.host.cpus == 2


def test_an_unknown_version_is_one_line_saying_which_and_how_to_rebuild(tmp_path):
    (tmp_path / "summary.json").write_bytes(orjson.dumps({**V1, "format_version": 7}))
    with pytest.raises(CputaxError) as exc:
        Summary.load(tmp_path / "summary.json")
    line = str(exc.value)
    assert "\n" not in line and "format version 7" in line and "reads 1, 2" in line
    assert f"cputax report {tmp_path}" in line
    with pytest.raises(CputaxError):
        Summary.check_version(tmp_path / "summary.json")
    (tmp_path / "summary.json").write_bytes(b'{"scenarios": [')  # torn: a rebuild replaces it
    Summary.check_version(tmp_path / "summary.json")


def _scenario(**changes) -> ScenarioSummary:
    """A scenario that crosses no line: HTTP OH 5 ms, engine queue 1 ms, client TTFT 25 ms
    as the server's."""
    base = ScenarioSummary(
        name="s",
        concurrency=4,
        context_tokens=1000,
        requests=4,
        mean_ms=PhaseTimes(
            serialize=1.0,
            http_overhead=5.0,
            prefill=20.0,
            decode=70.0,
            response_parse=0.5,
            total=97.0,
        ),
        server=ServerMetrics(
            mean_ms={"queue": 1.0, "ttft": 25.0}, api_server_cpu_s_per_request=0.01
        ),
        shared_stamps_pct=0.0,
    )
    return msgspec.structs.replace(base, **changes)


def _kinds(s: ScenarioSummary, info: dict | None = None) -> dict[str, Finding]:
    return {f.kind: f for f in scenario_findings(s, info or {})}


def _mean(**changes) -> PhaseTimes:
    return msgspec.structs.replace(_scenario().mean_ms, **changes)


def test_a_scenario_below_every_threshold_has_no_finding():
    assert _kinds(_scenario()) == {}


def test_http_overhead_far_above_the_queue_is_a_finding_past_ten_times():
    # queue 1 ms: 10.5 ms is past ten times it, 9.5 ms is not; prefill keeps TTFT in line
    above = _kinds(_scenario(mean_ms=_mean(http_overhead=10.5, prefill=14.5)))
    below = _kinds(_scenario(mean_ms=_mean(http_overhead=9.5, prefill=15.5)))
    assert above["http_oh_over_queue"].threshold == HTTP_OH_OVER_QUEUE
    assert "far above the engine's own queue time" in above["http_oh_over_queue"].text
    assert "http_oh_over_queue" not in below and "ttft_disagreement" not in above


def test_ttft_apart_by_more_than_a_quarter_is_a_finding():
    # the client's TTFT is HTTP OH + prefill = 25 ms; the server's 18.7 is 25.2% off, 18.9 is 24.4%
    off = _kinds(
        _scenario(
            server=ServerMetrics(
                mean_ms={"queue": 1.0, "ttft": 18.7}, api_server_cpu_s_per_request=0.01
            )
        )
    )
    near = _kinds(
        _scenario(
            server=ServerMetrics(
                mean_ms={"queue": 1.0, "ttft": 18.9}, api_server_cpu_s_per_request=0.01
            )
        )
    )
    assert off["ttft_disagreement"].threshold == TTFT_DISAGREEMENT and near == {}
    assert "the client saw TTFT 25.0 ms" in off["ttft_disagreement"].text


def test_shared_stamps_past_one_percent_and_the_other_scenario_findings():
    assert _kinds(_scenario(shared_stamps_pct=1.2))["shared_stamps"].threshold == SHARED_STAMPS_PCT
    assert _kinds(_scenario(shared_stamps_pct=0.9)) == {}
    flagged = _kinds(
        _scenario(prompt_tokens_flagged=True, prompt_tokens_mean=1030.0, prompt_tokens_off_pct=3.0)
    )
    assert "+3.0% off the 1,000 asked for" in flagged["prompt_size"].text
    assert "withheld" in _kinds(_scenario(withheld="1 of 4 requests break"))
    no_cpu = ServerMetrics(mean_ms={"queue": 1.0, "ttft": 25.0})
    assert "api_cpu_absent" in _kinds(_scenario(server=no_cpu))


def test_the_client_ceiling_is_crossed_past_its_share():
    ceiling = Ceiling(max_chunks_per_s=100, share=0.8)
    assert past_ceiling(_scenario(throughput=Throughput(chunks_per_s=81.0)), ceiling) is True
    assert past_ceiling(_scenario(throughput=Throughput(chunks_per_s=79.0)), ceiling) is False
    assert past_ceiling(_scenario(throughput=Throughput(chunks_per_s=81.0)), None) is None
    found = _kinds(
        _scenario(throughput=Throughput(chunks_per_s=81.0), past_client_ceiling=True),
        {"client_ceiling": {"max_chunks_per_s": 100, "share": 0.8}},
    )
    ceiling_finding = found["client_ceiling"]
    assert ceiling_finding.threshold == 0.8 and "81 chunks/s" in ceiling_finding.text


def _attribution(worker_wait: float) -> AttributionResult:
    loop = ThreadRow(
        process="engine_core_0",
        thread="MainThread",
        samples=500,
        categories={"worker_wait": worker_wait, "schedule": 0.02},
    )
    return AttributionResult(
        rules="test", alignment_ms=1.0, rate=100.0, windows=[Window(name="s", threads=[loop])]
    )


def test_in_short_names_the_engine_loop_wait_past_its_share():
    s = [_scenario()]
    first = in_short(s, {}, None, None)
    assert "At s (4 at once, 1,000-token prompts) a request took 97.0 ms" in first
    above = in_short(s, {}, None, _attribution(WAIT_SHARE + 0.05))
    below = in_short(s, {}, None, _attribution(WAIT_SHARE - 0.05))
    assert "spent 25% of it waiting for the model step" in above
    assert "waiting for the model step" not in below
    assert in_short([_scenario(mean_ms=PhaseTimes())], {}, None, None) is None
