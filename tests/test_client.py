"""The streaming client: SSE parsing on crafted bytes, then real HTTP on loopback against the stub.

Timing tolerances allow for a noisy 2-core machine: a measured component may
run late by tens of ms, never early by more than a millisecond or two.
"""

from __future__ import annotations

import asyncio
import re
import socket

import orjson
import pytest

from cputax.client.sse import SSEDecoder, StreamError, StreamParser
from cputax.client.stream import StreamingClient
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig, StubServer
from cputax.text.conversation import prompt_tokens
from cputax.text.tokenizer import load_tokenizer

MESSAGES = [
    {"role": "system", "content": "You are a coding agent."},
    {"role": "user", "content": "Fix the failing test in src/parser.py, then run the suite."},
]
MS = 1_000_000


def chat() -> dict:
    return {"model": "cputax-stub", "messages": MESSAGES}


def send(config: StubConfig, build=chat, **client_options) -> tuple[RequestRecord, dict]:
    """One request through StreamingClient against a fresh stub; the record and the stub's truth."""
    with StubServer(config) as stub:

        async def go() -> tuple[RequestRecord, dict]:
            async with StreamingClient(stub.url, **client_options) as client:
                record = await client.send(RequestRecord("test", index=3), build)
                return record, await client.get_json("/stub/truth")

        return asyncio.run(go())


def chunk(delta: dict | None = None, text: str | None = None, **extra) -> bytes:
    choice = {"index": 0, "delta": delta} if text is None else {"index": 0, "text": text}
    return b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [choice], **extra}) + b"\n\n"


def parse(data: bytes, api: str = "chat") -> RequestRecord:
    record = RequestRecord("unit")
    parser = StreamParser(record, api)
    parser.feed(data, 1)
    parser.eof(2)
    return record


# -- SSE parsing ----------------------------------------------------------------

STREAM = (
    b": keep-alive\r\n\r\n"
    + chunk({"role": "assistant", "content": ""}).replace(b"\n", b"\r\n")
    + chunk({"content": "Hello"})
    + b"event: message\n"
    + chunk({"content": " world"})
    + (
        b'data: {"id":"chatcmpl-1","choices":[],'
        b'"usage":{"prompt_tokens":7,"total_tokens":9,"completion_tokens":2}}\n\n'
    )
    + b"data: [DONE]\n\n"
)


def test_decoder_gives_the_same_lines_whatever_the_split():
    whole = SSEDecoder().feed(STREAM)
    assert [line for line in whole if line.startswith(b"data:")][-1] == b"data: [DONE]"
    for cut in range(1, len(STREAM)):
        decoder = SSEDecoder()
        lines = decoder.feed(STREAM[:cut]) + decoder.feed(STREAM[cut:]) + decoder.flush()
        assert [x for x in lines if x] == [x for x in whole if x], cut


def test_decoder_joins_a_line_spread_over_many_reads():
    line = b"data: " + b"x" * 100_000
    decoder = SSEDecoder()
    pieces = [line[i : i + 1000] for i in range(0, len(line), 1000)]
    assert all(decoder.feed(p) == [] for p in pieces)
    assert decoder.feed(b"\n") == [line]


def test_parser_reads_usage_and_counts_delta_chunks():
    record = parse(STREAM)
    assert (record.prompt_tokens, record.output_tokens, record.output_tokens_source) == (
        7,
        2,
        "usage",
    )
    assert record.chunks == 3  # role-only + two content chunks; the usage chunk has no choices
    assert record.extra["response_id"] == "chatcmpl-1"


def test_role_only_and_empty_deltas_are_not_the_first_token():
    record = RequestRecord("unit")
    parser = StreamParser(record)
    parser.feed(chunk({"role": "assistant", "content": ""}), 10)
    parser.feed(
        chunk({"content": ""})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}),
        20,
    )
    assert record.t_first_data == 10 and record.t_first_token is None
    parser.feed(chunk({"content": "x"}), 30)
    parser.feed(chunk({"content": "y"}) + b"data: [DONE]\n\n", 40)
    parser.eof(50)
    assert (record.t_first_token, record.t_last_token) == (30, 40)
    assert (record.output_tokens, record.output_tokens_source, record.chunks) == (2, "chunks", 5)


@pytest.mark.parametrize(
    "delta",
    [
        {"reasoning_content": "Let me think"},
        {"reasoning": "Let me think"},
        {
            "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function", "function": {"name": "run_shell"}}
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"command"'}}]},
    ],
)
def test_reasoning_and_tool_call_deltas_are_tokens(delta):
    assert parse(chunk(delta) + b"data: [DONE]\n\n").t_first_token == 1


def test_completions_tokens_are_non_empty_text():
    record = parse(chunk(text="") + chunk(text="Hi") + b"data: [DONE]", api="completions")
    assert (record.chunks, record.output_tokens, record.t_first_token) == (2, 1, 1)


def test_a_stream_closed_after_its_finish_reason_is_complete_without_done():
    # transformers serve never sends [DONE]: its last chunk has the finish_reason and usage.
    record = parse(
        chunk({"content": "x"})
        + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}],'
        + b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    )
    assert (record.output_tokens, record.output_tokens_source, record.chunks) == (1, "usage", 2)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"garbage without a field\n\n", "malformed SSE line 'garbage without a field'"),
        (b"data: {oops\n\n", "non-JSON data line '{oops'"),
        (b"data: [1, 2]\n\n", "not a JSON object"),
        (
            b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n',
            "server error in stream: engine died",
        ),
        (chunk({"content": "x"}), "stream ended before [DONE]"),
    ],
)
def test_parser_rejects_broken_streams(data, message):
    with pytest.raises(StreamError, match=re.escape(message)):
        parse(data)


# -- against the stub ---------------------------------------------------------------


def test_measured_components_match_the_injected_delays():
    # 100 ms between events: a stamp taken at the wrong event is that far off, more than
    # a loaded machine makes the client late
    a, b, c, n = 100, 100, 100, 4
    record, truth = send(
        StubConfig(
            headers_delay_ms=a,
            first_token_delay_ms=b,
            inter_token_delay_ms=c,
            output_tokens=n,
            token_truth=True,
        )
    )
    assert record.ok, record.error
    assert record.t_start <= record.t_sent < record.t_headers <= record.t_first_data
    assert record.t_first_data <= record.t_first_token <= record.t_last_token <= record.t_end
    # Against the stub's own stamps (the same monotonic clock): each of the client's stamps
    # lies between the stub's writing that event and its writing the next one. Never early
    # (no bytes are read before they are written); and its own event's time, not a later
    # one's. How late within that is this machine's, and not asserted.
    sent = truth[record.extra["response_id"]]
    tokens = sent["token_ns"]
    assert len(tokens) == n and tokens[0] == sent["first_token_ns"]
    assert sent["headers_ns"] <= record.t_headers < sent["first_token_ns"]
    assert sent["first_token_ns"] <= record.t_first_token < tokens[1]
    assert sent["last_token_ns"] <= record.t_last_token <= record.t_end
    # sent before the stub had the request: the HTTP overhead holds all of the headers' delay
    assert sent["arrival_ns"] >= record.t_sent and (record.t_headers - record.t_sent) / MS >= a
    assert record.build_s > 0 and record.parse_s > 0


def test_usage_counts_are_read_and_the_role_chunk_is_not_a_token():
    record, _ = send(StubConfig(output_tokens=8))
    assert record.ok and record.status == 200
    assert record.prompt_tokens == prompt_tokens(MESSAGES, None, load_tokenizer())
    assert (record.output_tokens, record.output_tokens_source) == (8, "usage")
    assert record.chunks == 9  # the role-only chunk has a delta too


def test_tokens_are_counted_from_chunks_without_usage():
    record, _ = send(StubConfig(output_tokens=8, fault="no_usage"))
    assert record.ok, record.error
    assert (record.output_tokens, record.output_tokens_source, record.prompt_tokens) == (
        8,
        "chunks",
        None,
    )


def test_max_tokens_and_completions_api():
    record, _ = send(
        StubConfig(output_tokens=8),
        build=lambda: {"prompt": "def add(a, b):", "max_tokens": 3},
        api="completions",
    )
    assert record.ok, record.error
    assert (record.output_tokens, record.chunks) == (3, 3)  # no role chunk in completions
    assert record.prompt_tokens == load_tokenizer().count("def add(a, b):")


@pytest.mark.parametrize(
    "fault, message",
    [
        ("http_500", "HTTP 500: stub fault: injected internal server error"),
        ("error_event", "server error in stream: stub fault: injected engine error"),
        ("malformed_sse", "malformed SSE line 'this line is not server-sent events'"),
        ("non_json_data", "non-JSON data line '{not json'"),
        ("reset_midstream", "connection broken mid-stream"),
        ("truncated", "stream ended before [DONE]"),
    ],
)
def test_broken_streams_give_ok_false_and_a_clear_error(fault, message):
    record, _ = send(StubConfig(output_tokens=4, fault=fault))
    assert not record.ok
    assert record.error is not None and record.error.startswith(message), record.error
    assert record.t_end is not None and record.t_end >= record.t_start


def test_connection_refused_is_a_record_not_an_exception():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go() -> RequestRecord:
        async with StreamingClient(f"http://127.0.0.1:{port}") as client:
            return await client.send(RequestRecord("test"), chat)

    record = asyncio.run(go())
    assert not record.ok and record.t_end is not None
    assert record.error == f"cannot connect to http://127.0.0.1:{port}: Connection refused"


def test_per_request_timeout_covers_the_stream():
    record, _ = send(StubConfig(first_token_delay_ms=5000), timeout_s=0.3)
    assert not record.ok and record.error == "timed out after 0.3 s (per-request timeout)"
    # ended by the 0.3 s timeout, before the first token (5 s) could end it
    assert record.t_headers is not None and (record.t_end - record.t_start) / MS < 5000


def test_api_key_goes_in_the_header_only():
    config = StubConfig(output_tokens=2, api_key="sk-secret-123")
    record, _ = send(config, api_key="wrong")
    assert not record.ok and record.error == "HTTP 401: Unauthorized"
    record, _ = send(config, api_key="sk-secret-123")
    assert record.ok, record.error
    assert b"sk-secret-123" not in record.to_json()


@pytest.mark.slow
def test_calibrate_json_has_the_documented_keys(capsys, tmp_path, monkeypatch):
    from cputax.commands.calibrate import calibrate
    from cputax.peers.calibrate import CEILING_SHARE, KEYS, load_ceiling
    from cputax.results.calibration import FORMAT_VERSION

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibrate([1, 4], as_json=True, requests_per_level=8) == 0
    result = orjson.loads(capsys.readouterr().out)
    kept = load_ceiling()  # for `cputax run`: the most chunks/s this machine's client took in
    best = max(level["max_chunks_per_s"] for level in result["levels"])
    assert kept is not None and kept.max_chunks_per_s == best and kept.share == CEILING_SHARE
    assert result["format_version"] == FORMAT_VERSION
    assert "same" in result["note"] and result["cpus"] >= 1
    assert "first_error" not in result["levels"][0]  # only a level with a failed request has one
    assert [level["concurrency"] for level in result["levels"]] == [1, 4]
    for level in result["levels"]:
        assert set(KEYS) <= set(level) and level["errors"] == 0
        assert 0 < level["client_cpu_us_per_chunk"] < 10_000
        assert level["max_chunks_per_s"] > 0
        assert 0 <= level["ttft_error_ms_p50"] <= level["ttft_error_ms_p99"] < 1000
        assert 0 <= level["headers_error_ms_p50"] <= level["headers_error_ms_p99"] < 1000
        assert 0 <= level["ttft_error_kernel_ms_p50"] <= level["ttft_error_kernel_ms_p99"] < 1000
        assert level["itl_error_kernel_ms_p99"] >= 0 and level["client_lag_ms_p99"] >= 0
