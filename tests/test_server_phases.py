"""Each request's own server phases (issue 20), without a model server: the OTLP receiver
fed by the real OpenTelemetry exporter over loopback HTTP, the join key on both HTTP paths
of the client and across load shards, and the join + derivations of analysis.server_phases
on a run directory built from known moments. tests/test_server_phases_vllm.py does the
same against the embedded vLLM."""

from __future__ import annotations

import asyncio
import importlib.util
import time
import urllib.error
import urllib.request

import orjson
import pytest

from cputax.analysis.server_phases import agree, join, server_phases
from cputax.client.otlp import SpanReceiver, parse_listen
from cputax.client.sse import StreamParser
from cputax.client.stream import StreamingClient
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord
from cputax.results.summary import ScenarioSummary, ServerMetrics, Summary
from cputax.rundir import RunDir
from cputax.servers import get

TRACING = get("vllm").capabilities.tracing
MS = 1_000_000


def _export(endpoint: str, spans: list[tuple[str, int, dict]]) -> None:
    """Spans as vLLM makes them (tracing/otel.py manual_instrument_otel): parent from a
    traceparent, explicit start time, kind SERVER; exported by the SDK's OTLP/HTTP exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer = provider.get_tracer("test")
    for trace_id, start_ns, attributes in spans:
        context = TraceContextTextMapPropagator().extract(
            {"traceparent": f"00-{trace_id}-{'7' * 16}-01"}
        )
        span = tracer.start_span(
            TRACING.span_name, context=context, start_time=start_ns, kind=SpanKind.SERVER
        )
        span.set_attributes(attributes)
        span.end()
    provider.shutdown()


def test_the_receiver_writes_what_the_exporter_sends_and_survives_a_bad_post(tmp_path):
    receiver = SpanReceiver(tmp_path / "spans.jsonl").start()
    try:
        trace = "0123456789abcdef" * 2
        start = time.time_ns()
        _export(
            receiver.endpoint,
            [(trace, start, {"gen_ai.request.id": "chatcmpl-x", "gen_ai.latency.e2e": 0.25})],
        )
        bad = urllib.request.Request(
            receiver.endpoint,
            data=b"\xff\x00 not protobuf",
            headers={"Content-Type": "application/x-protobuf"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=10)
        assert refused.value.code == 400
        _export(receiver.endpoint, [("f" * 32, start, {})])  # still listening after the bad one
    finally:
        meta = receiver.stop()
    lines = [orjson.loads(line) for line in (tmp_path / "spans.jsonl").read_bytes().splitlines()]
    assert [s["trace_id"] for s in lines] == [trace, "f" * 32]
    first = lines[0]
    assert first["name"] == TRACING.span_name and first["parent_span_id"] == "7" * 16
    assert first["start_unix_ns"] == start and first["kind"] == 2  # SPAN_KIND_SERVER
    assert first["attributes"] == {"gen_ai.request.id": "chatcmpl-x", "gen_ai.latency.e2e": 0.25}
    assert meta["spans"] == 2 and meta["refused"] == 1 and meta["clock"]["error_ns"] >= 0


def test_listen_address_in_one_line():
    assert parse_listen("0.0.0.0:4318") == ("0.0.0.0", 4318)
    assert parse_listen("[::1]:4318") == ("::1", 4318)
    for bad in ("4318", "host:", "host:port", ":4318", "h:70000"):
        with pytest.raises(CputaxError, match="HOST:PORT"):
            parse_listen(bad)


class _Recorder:
    """A minimal HTTP/1.1 server that keeps each request's headers and answers a vLLM-shaped
    stream (a role chunk with the first token, a usage chunk with per-request metrics)."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")[1:]
            headers = {
                k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)
            }
            await reader.readexactly(int(headers["content-length"]))
            self.headers.append(headers)
            chunks = [
                {
                    "id": "chatcmpl-1",
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}],
                },
                {
                    "id": "chatcmpl-1",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                },
                {
                    "id": "chatcmpl-1",
                    "choices": [],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1},
                    "metrics": {
                        "queue_time_ms": 0.5,
                        "time_to_first_token_ms": 7.0,
                        "generation_time_ms": 0.0,
                    },
                },
            ]
            body = (
                b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks)
                + b"data: [DONE]\n\n"
            )
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()


@pytest.mark.parametrize("wire", [True, False])
def test_every_request_carries_its_id_as_x_request_id_and_trace_id(wire):
    recorder = _Recorder()

    async def go() -> list[RequestRecord]:
        server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with StreamingClient(f"http://127.0.0.1:{port}", wire=wire) as client:
                return [
                    await client.send(
                        RequestRecord("s", index=i), lambda: {"model": "m", "messages": []}
                    )
                    for i in range(3)
                ]
        finally:
            server.close()

    records = asyncio.run(go())
    assert all(r.ok for r in records), [r.error for r in records]
    ids = [r.request_id for r in records]
    assert len(set(ids)) == 3 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert [h["x-request-id"] for h in recorder.headers] == ids
    for headers, rid in zip(recorder.headers, ids, strict=True):
        version, trace, parent, flags = headers["traceparent"].split("-")
        assert (version, trace, flags) == ("00", rid, "01") and len(parent) == 16
    # the final usage chunk's metrics become record.server, source "response"
    server = records[0].server
    assert server["source"] == "response" and server["arrival_ns"] is None
    assert (server["queue_ms"], server["prefill_ms"], server["decode_ms"]) == (0.5, 7.0, 0.0)


def test_a_usage_chunk_without_metrics_leaves_no_server_record():
    record = RequestRecord("s")
    parser = StreamParser(record)
    parser.feed(
        b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\n', 1
    )
    assert record.server is None and record.output_tokens == 2


def test_request_ids_are_unique_across_load_shards():
    from cputax.client.loadgen import run_scenario
    from cputax.client.shards import run_sharded
    from cputax.targets.stub import StubConfig, StubServer
    from cputax.text.tokenizer import load_tokenizer
    from cputax.workload.profiles import Scenario
    from cputax.workload.prompts import ScenarioPrompts, local_counter

    config = StubConfig(first_token_delay_ms=5.0, inter_token_delay_ms=1.0, output_tokens=4)
    tok = load_tokenizer()
    prompts = ScenarioPrompts(
        Scenario(name="s", context_tokens=200, max_tokens=4, concurrency=4, batches=3),
        tok,
        model=config.model,
    )
    asyncio.run(prompts.prepare(local_counter(tok)))
    lines: list[bytes] = []

    def work(client, share, start_ns, on_record, barrier):
        return run_scenario(
            client, prompts, on_record, seed=1, share=share, start_ns=start_ns, barrier=barrier
        )

    with StubServer(config, process=True) as stub:

        async def go():
            async with StreamingClient(stub.url) as client:
                return await run_sharded(2, client, work, lambda line, ok: lines.append(line), 16)

        window = asyncio.run(go())
    records = [RequestRecord.from_dict(orjson.loads(line)) for line in lines]
    assert window.procs == 2 and len(records) == 12 and all(r.ok for r in records)
    ids = [r.request_id for r in records]
    assert None not in ids and len(set(ids)) == len(ids)
    # the stub answers as vLLM does: the response id is the prefix + the X-Request-Id
    assert all(r.extra["response_id"] == f"chatcmpl-{r.request_id}" for r in records)


# --- the join, on a run directory of known moments --------------------------------------------
OFFSET = 1_700_000_000 * 10**9  # the wall clock minus the monotonic one in this made-up run


def _run(tmp_path, requests: list[dict], spans: list[dict], windows: list[dict]) -> RunDir:
    run = RunDir.create(tmp_path / "run")
    with JsonlWriter(run.requests) as out:
        for r in requests:
            out.write(RequestRecord(**r))
    with JsonlWriter(run.spans) as out:
        for s in spans:
            out.write(s)
    with JsonlWriter(run.windows) as out:
        for w in windows:
            out.write(w)
    return run


def _request(rid: str, sent: int, headers: int, first: int, last: int, **kw) -> dict:
    return {
        "scenario": "a",
        "ok": True,
        "request_id": rid,
        "t_start": sent - MS,
        "t_sent": sent,
        "t_headers": headers,
        "t_first_token": first,
        "t_last_token": last,
        "t_end": last + MS,
        **kw,
    }


def _span(
    trace_id: str,
    arrival: int,
    queue: float,
    prefill: float,
    decode: float,
    ttft: float,
    e2e: float,
    request_id: str | None = None,
) -> dict:
    attributes = {
        "gen_ai.latency.time_in_queue": queue,
        "gen_ai.latency.time_in_model_prefill": prefill,
        "gen_ai.latency.time_in_model_decode": decode,
        "gen_ai.latency.time_to_first_token": ttft,
        "gen_ai.latency.e2e": e2e,
        "gen_ai.usage.prompt_tokens": 10,
        "gen_ai.usage.completion_tokens": 4,
        "gen_ai.request.id": f"chatcmpl-{request_id or trace_id}",
    }
    return {
        "name": TRACING.span_name,
        "trace_id": trace_id,
        "start_unix_ns": arrival + OFFSET,
        "end_unix_ns": arrival + OFFSET + int(e2e * 1e9),
        "attributes": attributes,
    }


def test_spans_join_their_records_and_the_phases_follow_from_the_moments(tmp_path):
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    t0 = 10**12
    # a: sent at t0, arrives 2 ms later; TTFT 20 ms = 1 ms queue + 15 ms prefill + 4 ms front end;
    # the client gets the first token 0.5 ms after the server had it, the last 0.3 ms after
    req_a = _request(a, t0, t0 + 6 * MS, t0 + 22_500_000, t0 + 62_300_000)
    span_a = _span(a, t0 + 2 * MS, 0.001, 0.015, 0.040, 0.020, 0.060)
    # b: the span lost its trace (a proxy started its own): joined by the request id attribute
    req_b = _request(b, t0 + 100 * MS, t0 + 104 * MS, t0 + 120 * MS, t0 + 130 * MS)
    span_b = _span("d" * 32, t0 + 101 * MS, 0.0, 0.010, 0.010, 0.018, 0.028, request_id=b)
    # c: no span, but the response's metrics
    req_c = _request(
        c,
        t0 + 200 * MS,
        t0 + 204 * MS,
        t0 + 220 * MS,
        t0 + 230 * MS,
        server={"source": "response", "queue_ms": 2.0, "prefill_ms": 9.0, "decode_ms": 10.0},
    )
    stray = _span("e" * 32, t0 + 150 * MS, 0.0, 0.01, 0.01, 0.01, 0.02)  # in the window, no record
    warm = _span("f" * 32, t0 - 50 * MS, 0.0, 0.01, 0.01, 0.01, 0.02)  # before it: a warm-up
    run = _run(
        tmp_path,
        [req_a, req_b, req_c],
        [span_a, span_b, stray, warm],
        [{"scenario": "a", "start_ns": t0 - MS, "end_ns": t0 + 300 * MS}],
    )
    rows, unmatched = join(run, TRACING, OFFSET)
    by_id = {r.request_id: r for r in rows}
    assert by_id[a].server["source"] == by_id[b].server["source"] == "otlp"
    assert by_id[c].server["source"] == "response" and len(unmatched) == 2
    pa = by_id[a].phases
    assert pa["http_in"] == pytest.approx(2.0) and pa["front_end"] == pytest.approx(4.0)
    assert pa["engine_queue"] == pytest.approx(1.0) and pa["model_prefill"] == pytest.approx(15.0)
    assert pa["stream_out"] == pytest.approx(0.3)
    assert pa["client_ttft"] == pytest.approx(22.5) and pa["server_ttft_in"] == pytest.approx(22.0)
    assert by_id[c].phases["http_in"] is None and by_id[c].phases["engine_queue"] == 2.0

    scenarios = [ScenarioSummary(name="a", server=ServerMetrics(mean_ms={"queue": 1.0}))]
    run.write_info(
        {
            "server": {"name": "vllm"},
            "monitors": {"otlp": {"clock": {"offset_ns": OFFSET, "error_ns": 40}}},
        }
    )
    out, per_scenario = server_phases(run, run.info(), scenarios)
    s = per_scenario["a"]
    assert s.records == s.with_server == 3 and s.sources == {"otlp": 2, "response": 1}
    assert s.records_without_span == 1 and s.spans_without_record == 1
    assert (
        out.spans_received == 4 and out.spans_outside_windows == 1 and out.source == "otlp+response"
    )
    assert s.prometheus_mean_ms.queue == 1.0
    assert s.per_request_mean_ms.queue == pytest.approx((1.0 + 0.0 + 2.0) / 3)


def test_client_and_server_disagreeing_is_a_finding_with_how_much_and_where(tmp_path):
    t0 = 10**12
    rows = []
    spans = []
    for i in range(5):
        rid = f"{i:032x}"
        sent = t0 + i * 100 * MS
        # the server had the first token 10 ms after arrival; the client got it 30 ms later
        rows.append(_request(rid, sent, sent + 5 * MS, sent + 41 * MS, sent + 60 * MS))
        spans.append(_span(rid, sent + MS, 0.0, 0.004, 0.015, 0.010, 0.030))
    run = _run(tmp_path, rows, spans, [{"scenario": "a", "start_ns": t0, "end_ns": t0 + 10**9}])
    run.write_info(
        {
            "server": {"name": "vllm"},
            "monitors": {"otlp": {"clock": {"offset_ns": OFFSET, "error_ns": 40}}},
        }
    )
    out, per_scenario = server_phases(run, run.info(), [ScenarioSummary(name="a")])
    ttft = per_scenario["a"].agreement.ttft
    assert not ttft.agree and ttft.diff_p50_ms == pytest.approx(30.0)
    assert ttft.requests_agreeing == 0.0
    assert any(
        line.startswith("a: TTFT") and "+30.00 ms" in line and "client's is longer" in line
        for line in out.findings
    )


def test_agreement_is_one_ms_plus_five_percent():
    assert agree(100.0, 94.1) and not agree(100.0, 93.9)
    assert agree(2.0, 1.05) and not agree(2.0, 0.85)


def test_no_account_from_the_server_is_one_line(tmp_path):
    run = _run(
        tmp_path,
        [_request("a" * 32, 10**12, 10**12 + MS, 10**12 + 2 * MS, 10**12 + 3 * MS)],
        [],
        [],
    )
    run.write_info({"server": {"name": "vllm"}})
    out, per_scenario = server_phases(run, run.info(), [ScenarioSummary(name="a")])
    assert out.source == "none" and "--otlp-traces-endpoint" in out.note
    assert per_scenario["a"].coverage == 0.0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra")
def test_request_ids_are_unique_across_ray_shards_and_reach_the_server(tmp_path):
    # Ray itself is not imported here: cputax keeps a local cluster on loopback only when it
    # imports Ray first (cluster.ray_env)
    from cputax.cluster.ray_env import RayOptions
    from cputax.commands.run import run
    from cputax.session import RunOptions
    from cputax.targets.stub import StubConfig, StubServer

    profile = tmp_path / "p.toml"
    profile.write_text(
        '[defaults]\nmax_tokens = 4\nwarmup = 1\n[[scenario]]\nname = "c4"\nconcurrency = 4\n'
        "context_tokens = 300\nbatches = 3\n"
    )
    config = StubConfig(first_token_delay_ms=5.0, inter_token_delay_ms=1.0, output_tokens=4)
    with StubServer(config, process=True) as stub:
        options = RunOptions(
            endpoint=stub.url,
            profile=profile,
            out=tmp_path / "out",
            client_procs=2,
            ray=RayOptions(num_cpus=2),
        )
        assert run(options) == 0
    records = RunDir(tmp_path / "out").read_requests()
    window = RunDir(tmp_path / "out").read_windows()[0]
    assert window["client_procs"] == 2 and window["shard_records"] == [6, 6]
    ids = [r.request_id for r in records]
    assert len(records) == 12 and None not in ids and len(set(ids)) == 12
    assert all(r.extra["response_id"] == f"chatcmpl-{r.request_id}" for r in records)


def test_a_first_token_stamped_with_the_last_is_left_out_of_the_ttft_check(tmp_path):
    t0 = 10**12
    rows, spans = [], []
    for i in range(3):
        rid = f"{i:032x}"
        sent = t0 + i * 100 * MS
        # agreeing: the server's first token at 10 ms after arrival (1 ms), the client's at 11.2
        rows.append(
            _request(rid, sent, sent + 5 * MS, sent + 11_200_000, sent + 40 * MS, output_tokens=4)
        )
        spans.append(_span(rid, sent + MS, 0.0, 0.004, 0.028, 0.010, 0.039))
    # every token in the read of the last one: its first-token stamp says 39 ms
    rows.append(
        _request(
            "f" * 32, t0 + 900 * MS, t0 + 905 * MS, t0 + 941 * MS, t0 + 941 * MS, output_tokens=4
        )
    )
    spans.append(_span("f" * 32, t0 + 901 * MS, 0.0, 0.004, 0.028, 0.010, 0.039))
    run = _run(tmp_path, rows, spans, [{"scenario": "a", "start_ns": t0, "end_ns": t0 + 10**10}])
    run.write_info(
        {"server": {"name": "vllm"}, "clock": {"time_ns": OFFSET + 5, "monotonic_ns": 5}}
    )
    out, per_scenario = server_phases(run, run.info(), [ScenarioSummary(name="a")])
    sp = per_scenario["a"]
    assert sp.first_token_merged == 1 and sp.agreement.ttft.n == 3
    assert sp.agreement.ttft.agree and sp.agreement.ttft.requests_agreeing == 1.0
    assert not [line for line in out.findings if "TTFT" in line]


def test_the_parser_marks_a_first_token_read_with_the_second():
    record = RequestRecord("s")
    parser = StreamParser(record)
    chunk = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'
    parser.feed(chunk * 2, 5, 7)  # two tokens in one read
    parser.feed(chunk, 9, 11)
    assert record.extra["first_token_shared"] is True and record.shared_stamps == 1
    alone = RequestRecord("s")
    parser = StreamParser(alone)
    parser.feed(chunk, 5, 7)
    parser.feed(chunk * 2, 9, 11)  # the second and third together: the first stands alone
    assert "first_token_shared" not in alone.extra and alone.shared_stamps == 1


def _skewed_run(tmp_path, skew_ns: int, local: bool, drift_ns: int = 0):
    """Ten requests whose server stamps its spans on a clock `skew_ns` ahead of the
    client's (and drifting `drift_ns` per request); http_in of request i is 1 + i/2 ms."""
    t0 = 10**12
    rows, spans = [], []
    for i in range(10):
        rid = f"{i + 1:032x}"
        sent = t0 + i * 100 * MS
        arrival = sent + MS + i * MS // 2
        rows.append(_request(rid, sent, arrival + 3 * MS, arrival + 12 * MS, arrival + 30 * MS))
        spans.append(_span(rid, arrival + skew_ns + i * drift_ns, 0.0, 0.004, 0.015, 0.010, 0.030))
    run = _run(tmp_path, rows, spans, [{"scenario": "a", "start_ns": t0, "end_ns": t0 + 10**9}])
    run.write_info(
        {
            "server": {"name": "vllm"},
            "target": {"kind": "external", "local": local},
            "monitors": {"otlp": {"clock": {"offset_ns": OFFSET, "error_ns": 40}}},
        }
    )
    return server_phases(run, run.info(), [ScenarioSummary(name="a")])


def test_a_remote_servers_clock_offset_is_bounded_by_its_requests_and_applied(tmp_path):
    skew = 3_700 * MS  # the server's wall clock runs 3.7 s ahead of the client's
    out, per_scenario = _skewed_run(tmp_path, skew, local=False)
    clock = out.span_clock
    # arrival lies between send and headers: the offset is bounded by the tightest request
    # on each side (request 0: 1 ms after its send; every request: 3 ms before its headers)
    assert clock.lo_ns == skew - 3 * MS and clock.hi_ns == skew + MS
    assert clock.consistent and not clock.on_this_host and clock.applied_ns == skew - MS
    assert out.clock_error_ns == 40 + 2 * MS  # the receiver's own, plus half the bounds
    from cputax.report.server_phases import server_phases_section

    text = server_phases_section(
        Summary(
            scenarios=[ScenarioSummary(name="a", server_phases=per_scenario["a"])],
            server_phases=out,
        )
    )
    assert "on another host" in text and "[+3697.000, +3701.000] ms" in text
    assert "applied +3699.000 ms; clock error 2.000 ms" in text
    http_in = per_scenario["a"].phases_ms.http_in
    # the truth (1 to 5.5 ms) moved by the estimate's error (applied - skew = -1 ms), no more
    assert http_in.min == pytest.approx(2.0) and http_in.mean == pytest.approx(1 + 2.25 + 1)
    assert not [line for line in out.findings if "offset" in line or "[send, headers]" in line]


def test_spans_that_no_single_offset_fits_are_a_finding(tmp_path):
    # on this host, a skew of 3.7 s means the stamps are wrong: said, not applied
    out, _ = _skewed_run(tmp_path / "local", 3_700 * MS, local=True)
    assert out.span_clock.applied_ns == 0 and not out.span_clock.consistent
    assert any("outside [send, headers]" in line for line in out.findings)
    # elsewhere, a clock drifting 2 ms per request: no one offset fits all ten
    out, _ = _skewed_run(tmp_path / "drift", 3_700 * MS, local=False, drift_ns=2 * MS)
    assert not out.span_clock.consistent
    assert any("no one clock offset" in line for line in out.findings)
    # and a server on this host whose stamps fit: nothing to say, nothing applied
    out, _ = _skewed_run(tmp_path / "fine", 0, local=True)
    assert out.span_clock.consistent and out.span_clock.applied_ns == 0
    assert not [line for line in out.findings if "offset" in line or "[send, headers]" in line]
