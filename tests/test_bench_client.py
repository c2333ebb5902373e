"""The peer benchmark in its shortest mode: it runs every client it can and prints its table.
It asserts no speed (a shared machine); the figures are in the README, with the command."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from cputax.peers import aiperf as peer_aiperf
from cputax.peers import guidellm as peer_guidellm
from cputax.peers.calibrate import TIMED, errors_against_truth
from cputax.peers.clients import available, run_peer
from cputax.results.calibration import PeerRun
from cputax.targets.stub import StubServer

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_client.py"


@pytest.mark.slow
def test_the_peer_benchmark_produces_its_table(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = orjson.loads(out.read_bytes())
    clients = {r["client"] for r in result["peers"]}
    expected = (
        {"cputax"}
        | ({"vllm-bench"} if importlib.util.find_spec("vllm") else set())
        | {peer for peer in ("aiperf", "guidellm") if available(peer) is None}
    )
    assert clients == expected
    for row in result["peers"]:
        assert {
            "client",
            "streams",
            "cpu_us_per_chunk",
            "ttft_error_ms_p50",
            "ttft_error_ms_p99",
            "max_chunks_per_s",
        } <= set(row) and row["errors"] == 0
    assert {s["client"] for s in result["skipped"]} >= {"aiperf", "guidellm"} - {
        r["client"] for r in result["peers"]
    }
    assert "Load clients side by side" in proc.stdout and "max chunk/s" in proc.stdout


def _run(cpu: float, ttft_p99: float, itl_p99: float | None, max_chunks: float) -> PeerRun:
    return PeerRun(
        client="x",
        streams=4,
        requests=8,
        stamps="loop",
        errors=0,
        cpu_us_per_chunk=cpu,
        ttft_error_ms_p50=None,
        ttft_error_ms_p99=ttft_p99,
        itl_error_ms_p99=itl_p99,
        ttft_error_loop_ms_p99=None,
        itl_error_loop_ms_p99=None,
        max_chunks_per_s=max_chunks,
    )


def test_ratios_to_cputax_are_taken_repeat_by_repeat():
    from cputax.peers.calibrate import paired_ratios

    ours = [_run(5.0, 1.0, None, 10.0), _run(10.0, 1.0, None, 10.0), _run(30.0, 2.0, None, 10.0)]
    theirs = [_run(10.0, 3.0, 1.0, 5.0), _run(40.0, 3.0, 1.0, 5.0), _run(30.0, 3.0, 1.0, 5.0)]
    out = paired_ratios(theirs, ours)
    # pairs 2, 4, 1: median 2 (the ratio of the medians would say 30 / 10 = 3)
    assert out.cpu_us_per_chunk == 2.0 and out.cpu_us_per_chunk_range == [1.0, 4.0]
    assert out.ttft_error_ms_p99 == 3.0 and out.max_chunks_per_s == 0.5
    assert out.itl_error_ms_p99 is None  # no pair where both had a figure


@pytest.mark.slow
@pytest.mark.skipif(
    peer_aiperf.find() is None,
    reason=f"aiperf not found (.ci/run installs it; or set {peer_aiperf.ENV})",
)
def test_aiperf_runs_as_a_user_runs_it_and_its_requests_meet_the_stubs_truth():
    with StubServer(TIMED, process=True) as stub:
        run = run_peer("aiperf", stub.url, TIMED.model, 4, 12, TIMED.output_tokens)
        sent = _truth(stub.url)
    # 4 warm-up requests reached the stub too, and are not among the profiling ones
    assert len(run.requests) == 12 and _requests(sent) == 16
    assert all(r["ok"] and r["key"] in sent for r in run.requests)
    assert all(len(r["tokens"]) == TIMED.output_tokens for r in run.requests)
    errors = errors_against_truth(run.requests, sent)
    assert len(errors["ttft"]) == 12 and len(errors["itl"]) == 12 * (TIMED.output_tokens - 1)
    # its clock, brought back to the monotonic one: never before the stub sent the token,
    # and not seconds off (a wrong conversion would be)
    assert min(errors["ttft"]) > -1.0 and max(errors["ttft"]) < 1000.0
    assert run.cpu_s > 0 and 0 < run.wall_ns < 60e9


def _requests(truth: dict) -> int:
    """How many requests the stub served: it keeps each one's truth under the request id and
    the response id alike (a request sent with X-Request-Id is listed twice)."""
    return len({t["arrival_ns"] for t in truth.values()})


def _truth(url):
    import asyncio

    from cputax.client.stream import StreamingClient

    async def go():
        async with StreamingClient(url) as client:
            return await client.get_json("/stub/truth")

    return asyncio.run(go())


@pytest.mark.slow
@pytest.mark.skipif(
    peer_guidellm.find() is None,
    reason=f"guidellm not found (.ci/run installs it; or set {peer_guidellm.ENV})",
)
def test_guidellm_runs_as_a_user_runs_it_and_its_requests_meet_the_stubs_truth():
    with StubServer(TIMED, process=True) as stub:
        run = run_peer("guidellm", stub.url, TIMED.model, 4, 12, TIMED.output_tokens)
        sent = _truth(stub.url)
    # its warm-up (4 finished, and the requests started before its end) is not among them
    assert _requests(sent) == 16 and 0 < len(run.requests) <= 12
    assert all(
        r["ok"] and r["key"] in sent for r in run.requests
    )  # keyed by the stub's response id
    errors = errors_against_truth(run.requests, sent)
    assert (
        len(errors["ttft"]) == len(run.requests) and not errors["itl"]
    )  # it keeps no time per token
    assert min(errors["ttft"]) > -1.0 and max(errors["ttft"]) < 1000.0
    assert run.cpu_s > 0 and 0 < run.wall_ns < 60e9


def test_guidellms_warmup_share_of_the_window_is_taken_out(tmp_path):
    from cputax.client.wire import Clock

    def request(start, first, last, tokens=10, rid="x"):
        return {
            "response_id": rid,
            "info": {
                "timings": {
                    "request_start": start,
                    "first_token_iteration": first,
                    "last_token_iteration": last,
                    "request_end": last,
                    "token_iterations": tokens,
                }
            },
        }

    # the benchmark starts at 100 s: a warm-up request still streams its 10 tokens from 99.5
    # to 100.5 s, half of them inside the measured request's 100.0-101.0 s
    report = {
        "benchmarks": [
            {
                "start_time": 100.0,
                "requests": {
                    "successful": [
                        request(99.0, 99.5, 100.5, rid="warm"),
                        request(100.0, 100.0, 101.0, rid="measured"),
                    ]
                },
            }
        ]
    }
    path = tmp_path / "benchmarks.json"
    path.write_bytes(orjson.dumps(report))
    found = peer_guidellm.parse_report(path, Clock(offset_ns=0, error_ns=0))
    assert [r["key"] for r in found["requests"]] == ["measured"]
    assert found["start_ns"] == 100_000_000_000 and found["end_ns"] == 101_000_000_000
    assert found["share"] == pytest.approx(10 / 15)
    assert found["requests"][0]["first"] == 100_000_000_000


def test_a_peer_named_by_a_wrong_path_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(peer_aiperf.ENV, str(tmp_path / "no-such-aiperf"))
    assert (
        available("aiperf")
        == f"${peer_aiperf.ENV} is {tmp_path / 'no-such-aiperf'}, which is not an executable file"
    )
    monkeypatch.delenv(peer_guidellm.ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert available("guidellm").startswith(
        "not found: install it in a venv of its own (pip install guidellm)"
    )
