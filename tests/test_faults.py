"""Faults (issue 18): servers that misbehave the ways real ones do, driven through the
real client over loopback HTTP (tests/faultserver.py writes the bytes). For each: no
exception out of the client, a record for every request, a readable reason; valid
responses (ended by the close, CR line endings, 1-byte writes) succeed.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from faultserver import MODEL, FaultServer, answer, chunk, events, hang, probe_or, reset, stream
from helpers import start_run

from cputax.analysis import analyse
from cputax.client.probes import probe
from cputax.client.stream import StreamingClient
from cputax.commands.report import report as report_cmd
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord, read_requests
from cputax.rundir import RunDir
from cputax.text.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "hi"}]
HEAD = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "model": MODEL}
SRC = str(Path(__file__).resolve().parents[1] / "src")


def send_all(url: str, n: int = 1, **options) -> list[RequestRecord]:
    """`n` requests at once through StreamingClient; their records."""

    async def go() -> list[RequestRecord]:
        async with StreamingClient(
            url, timeout_s=options.pop("timeout_s", 20.0), **options
        ) as client:
            return await asyncio.gather(
                *(
                    client.send(
                        RequestRecord("s", index=i), lambda: {"model": MODEL, "messages": MESSAGES}
                    )
                    for i in range(n)
                )
            )

    return asyncio.run(go())


def bad(obj) -> list[bytes]:
    """A good stream with `obj` (a chunk of valid JSON, wrong types) after its first token."""
    good = events(3)
    return good[:2] + [chunk(obj)] + good[2:]


WRONG_TYPES = {
    "delta is a number": {**HEAD, "choices": [{"index": 0, "delta": 5}]},
    "choices is a string": {**HEAD, "choices": "abc"},
    "a choice is a number": {**HEAD, "choices": [5]},
    "usage is a number": {**HEAD, "choices": [], "usage": 5},
    "tool_calls holds a number": {**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": [5]}}]},
    "tool_calls is a string": {**HEAD, "choices": [{"index": 0, "delta": {"tool_calls": "x"}}]},
    "function is a list": {
        **HEAD,
        "choices": [{"index": 0, "delta": {"tool_calls": [{"function": [1]}]}}],
    },
    "usage count is text": {
        **HEAD,
        "choices": [],
        "usage": {"prompt_tokens": "abc", "completion_tokens": 1},
    },
}


@pytest.mark.parametrize("wire", [True, False], ids=["wire", "aiohttp"])
@pytest.mark.parametrize("name", list(WRONG_TYPES))
def test_a_chunk_of_wrong_types_is_that_requests_error(name, wire):
    routes = {"/v1/chat/completions": stream(bad(WRONG_TYPES[name]))}
    with FaultServer(routes) as server:
        records = send_all(server.url, 3, wire=wire)
    assert len(records) == 3 and len(server.chat_bodies) == 3  # every request sent is a record
    for record in records:
        assert not record.ok and record.error.startswith("bad chunk: "), record.error
        assert record.t_end and record.t_first_token  # what it had received is kept


def _sse_handler(version: str):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = version

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for event in events(4):
                self.wfile.write(event)
                self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    return Handler


@pytest.mark.parametrize("wire", [True, False], ids=["wire", "aiohttp"])
@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_pythons_http_server_streaming_sse_until_the_close_succeeds(version, wire):
    """The real http.server: no Content-Length, no chunking, the body ends at the close."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _sse_handler(version))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        records = send_all(f"http://127.0.0.1:{server.server_address[1]}", 2, wire=wire)
    finally:
        server.shutdown()
        server.server_close()
    assert all(r.ok for r in records), [r.error for r in records]
    assert [r.output_tokens for r in records] == [4, 4]


# (reply, ok (None: either), the error's start): the faults the client already handled, so none
# comes back
WELL_HANDLED = {
    "close-delimited HTTP/1.1": (stream(events(), framing="close"), True, None),
    "close-delimited HTTP/1.0": (stream(events(), framing="close", version="1.0"), True, None),
    "content-length body": (stream(events(), framing="length"), True, None),
    "CRLF endings": (stream(events(), newline=b"\r\n"), True, None),
    "bare CR endings": (stream(events(), newline=b"\r"), True, None),
    "comments, event and id fields": (
        stream([b": keep-alive\n\n", b"event: message\nid: 7\n"] + events()),
        True,
        None,
    ),
    "1-byte writes": (stream(events(), piece=1), True, None),
    # own client: valid HTTP, taken; aiohttp: past its header limit, one line
    "10 MB headers": (stream(events(), headers=b"X-Big: " + b"a" * (10 << 20) + b"\r\n"), None, ""),
    "reset mid-stream": (stream(events()[:2], end="reset"), False, "connection broken mid-stream"),
    "clean close mid-stream": (
        stream(events()[:2], framing="close"),
        False,
        "stream ended before [DONE]",
    ),
    "close mid-chunk": (stream(events()[:2], end="close"), False, "connection broken mid-stream"),
    "reset before answering": (reset(), False, "connection broken mid-stream"),
    "500 with HTML": (
        answer(500, b"<html><body>oops</body></html>", "text/html"),
        False,
        "HTTP 500: <html>",
    ),
    "429": (answer(429, {"error": {"message": "slow down"}}), False, "HTTP 429: slow down"),
    "400": (answer(400, {"detail": "bad field"}), False, "HTTP 400: bad field"),
    "error body ended by the close": (
        answer(503, b"busy", "text/plain", length=False),
        False,
        "HTTP 503: busy",
    ),
    "non-JSON data line": (
        stream(events()[:2] + [b"data: {nope\n\n"]),
        False,
        "non-JSON data line",
    ),
    "not SSE": (stream(events()[:2] + [b"hello there\n\n"]), False, "malformed SSE line"),
    "10 MB line": (
        stream(events()[:2] + [b"data: " + b"x" * (10 << 20) + b"\n\n"]),
        False,
        "non-JSON data line",
    ),
    "error object": (
        stream(events()[:2] + [chunk({"error": {"message": "engine died"}})]),
        False,
        "server error in stream: engine died",
    ),
    "JSON, not SSE": (answer(200, {"choices": []}), False, "expected a text/event-stream response"),
}


@pytest.mark.parametrize("wire", [True, False], ids=["wire", "aiohttp"])
@pytest.mark.parametrize("name", list(WELL_HANDLED))
def test_transport_faults(name, wire):
    reply, ok, error = WELL_HANDLED[name]
    with FaultServer({"/v1/chat/completions": reply}) as server:
        records = send_all(server.url, 2, wire=wire)
    assert len(records) == len(server.chat_bodies) == 2
    for record in records:
        if ok is None:  # either answer is right, as long as it is a record with a one-line reason
            ok = record.ok if wire else False
        assert record.ok is ok, record.error
        if ok:
            assert record.output_tokens == 3 and record.error is None
        elif wire or not error.startswith(
            "connection broken"
        ):  # aiohttp words transport errors its own way
            assert record.error.startswith(error), record.error
        else:
            assert record.error and "\n" not in record.error


def test_a_server_that_dies_mid_batch_leaves_a_record_per_request():
    routes = {"/v1/chat/completions": stream(events(), delay_s=0.3)}
    with FaultServer(routes) as server:
        records = []

        def kill_soon():
            time.sleep(0.5)
            server.__exit__()

        killer = threading.Thread(target=kill_soon)
        killer.start()
        records = send_all(server.url, 4)
        killer.join()
    assert len(records) == 4 and not any(r.ok for r in records)
    assert all(r.error for r in records)


def test_the_api_key_a_server_echoes_is_not_kept():
    key = "sk-do-not-keep-9876"
    echo = answer(401, {"error": {"message": f"bad header Authorization: Bearer {key}"}})
    with FaultServer({"/v1/chat/completions": echo}) as server:
        (record,) = send_all(server.url, 1, api_key=key)
        assert server.headers_seen[-1] == f"Bearer {key}".encode()  # it was sent
    assert key not in record.to_json().decode() and "[api key]" in record.error


# --- probes ---------------------------------------------------------------------------------
BOUND_S = 0.5  # the probes' bound in these tests; every check allows many times it


def run_probe(routes, model=None, timeout_s=BOUND_S):
    tokenizer = load_tokenizer()
    with FaultServer(routes) as server:

        async def go():
            async with StreamingClient(server.url, timeout_s=600) as client:
                return await probe(client, server.url, model, "chat", tokenizer, timeout_s)

        start = time.monotonic()
        try:
            return asyncio.run(go()), time.monotonic() - start
        finally:
            server.__exit__()


def test_auxiliary_endpoints_that_hang_cost_one_bound_each_and_say_so():
    found, took = run_probe({"/tokenize": hang(), "/metrics": hang(), "/version": hang()})
    assert found.model == MODEL and found.counter_name.startswith("local")
    assert not found.has_metrics and found.version is None
    assert any(n.startswith("/metrics: no answer within 0.5 s") for n in found.notes), found.notes
    assert found.ignore_eos and found.ignore_eos_words() == "sent"  # the chat probes were fine
    assert took < 3 * BOUND_S + 10  # three bounds, and a loaded machine's slack; not 3 x 600 s


def test_a_chat_endpoint_that_hangs_is_probed_once_and_ignore_eos_is_not_claimed():
    found, took = run_probe({"/v1/chat/completions": hang()})
    assert not found.ignore_eos and found.tools == "auto"
    assert found.ignore_eos_words().startswith(
        "not sent (ignore_eos: its probe failed (no answer within"
    )
    assert found.refused.startswith("not probed")
    assert took < 2 * BOUND_S + 10


def test_a_server_that_answers_nothing_stops_the_run_within_the_bound():
    start = time.monotonic()
    with pytest.raises(CputaxError, match=r"cannot reach .*/v1/models \(no answer within 0.5 s"):
        run_probe({"/v1/models": hang()})
    assert time.monotonic() - start < BOUND_S + 10


@pytest.mark.parametrize(
    "listing", [{"data": 5}, {"data": [{"id": 5}]}, [1, 2], {"data": [7, None]}]
)
def test_a_malformed_model_list_is_one_line(listing):
    with pytest.raises(CputaxError, match="lists no model; pass --model NAME"):
        run_probe({"/v1/models": answer(200, listing)})
    found, _ = run_probe({"/v1/models": answer(200, listing)}, model="mine")
    assert found.model == "mine"


@pytest.mark.parametrize("count", ["abc", None, -1, [3], True])
def test_a_tokenize_without_a_count_falls_back_to_the_local_tokenizer(count):
    found, _ = run_probe({"/tokenize": answer(200, {"count": count})})
    assert found.counter_name.startswith("local")


def test_metrics_that_are_not_prometheus_text_are_left_out_with_one_line():
    page = answer(200, b"<html><body>login</body></html>", "text/html")
    found, _ = run_probe({"/metrics": page})
    assert not found.has_metrics
    assert [n for n in found.notes if n.startswith("/metrics: not Prometheus text")], found.notes


# --- the command line -----------------------------------------------------------------------
def cputax(
    *args: str, timeout: float = 300, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "cputax", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "endpoint", ["http://127.0.0.1:99999", "http://", "ftp://x", "127.0.0.1:8000"]
)
def test_a_bad_endpoint_is_one_line(endpoint, tmp_path):
    done = cputax("run", "--endpoint", endpoint, "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().startswith("cputax run: error: --endpoint")
        and "\n" not in done.stderr.strip()
    )


def test_a_profile_that_is_a_directory_is_one_line(tmp_path):
    done = cputax("run", "--endpoint", "http://127.0.0.1:9", "--profile", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is a directory" in done.stderr


PROFILE = """
[defaults]
max_tokens = 20
warmup = 0
context_tokens = 50
[[scenario]]
name = "first"
concurrency = 4
batches = 3
[[scenario]]
name = "second"
concurrency = 2
batches = 1
"""


def test_a_run_goes_on_past_bad_metrics_and_bad_chunks_and_keeps_the_key_out(tmp_path):
    """End to end: /metrics an HTML page, /tokenize hanging, one scenario's streams broken by a
    chunk of wrong types: later scenarios run, summary and report are written, no traceback,
    and the key the server echoes is in no file."""
    key = "sk-never-in-a-file-5555"
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    broken = stream(bad({**HEAD, "choices": [{"index": 0, "delta": 5}]}))
    echo = answer(400, {"error": {"message": f"you sent Bearer {key}"}})

    sent = iter(range(1000))

    def each(writer, request):  # every third request of the run echoes the key in a 400
        return (echo if next(sent) % 3 == 0 else broken)(writer, request)

    by_scenario = probe_or(each)

    routes = {
        "/metrics": answer(200, b"<html>nope</html>", "text/html"),
        "/tokenize": hang(),
        "/v1/chat/completions": by_scenario,
    }
    with FaultServer(routes) as server:
        done = cputax(
            "run",
            "--endpoint",
            server.url,
            "--profile",
            str(profile),
            "--out",
            str(tmp_path / "o"),
            "--probe-timeout",
            "1",
            "--api-key-env",
            "FAULT_KEY",
            "--gpu",
            "none",
            env_extra={"FAULT_KEY": key},
        )
    out = tmp_path / "o"
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1  # it measured errors
    assert "probe: /metrics: not Prometheus text" in done.stderr
    records = read_requests(out / "requests.jsonl")
    assert len(records) == len(server.measured()) == 14
    assert {r.scenario for r in records} == {"first", "second"}
    assert all(r.error.startswith(("bad chunk: ", "HTTP 400: ")) for r in records)
    assert (out / "summary.json").exists() and (out / "report.md").exists()
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


# --- Ctrl-C and SIGTERM -----------------------------------------------------------------------
SLOW = stream(events(20), delay_s=0.1)  # a request takes about 2 s: a batch is in flight for long


@pytest.mark.parametrize(
    ("sig", "procs"),
    [(signal.SIGINT, "1"), (signal.SIGTERM, "1"), (signal.SIGINT, "2"), (signal.SIGTERM, "2")],
    ids=["int", "term", "int-shards", "term-shards"],
)
def test_an_interrupted_run_keeps_every_request_and_says_so(sig, procs, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and SIGTERM (to
    cputax alone, as `kill`, `timeout` and Kubernetes send it) end a run the same way."""
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "o"
    with FaultServer({"/v1/chat/completions": probe_or(SLOW)}) as server:
        proc = start_run(server.url, profile, out, "--client-procs", procs)
        deadline = time.monotonic() + 240
        while len(server.measured()) < 8 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)  # the second batch of "first" is in flight
        time.sleep(0.5)
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=240)
        sent = len(server.measured())
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert f"interrupted by {signal.Signals(sig).name}" in err
    records = read_requests(out / "requests.jsonl")
    assert sent == 8 and len(records) == sent  # every request sent is a record
    cancelled = [r for r in records if r.error == "cancelled"]
    assert len(cancelled) == 4 and all(r.batch == 1 and r.t_end and r.t_headers for r in cancelled)
    assert all(r.ok for r in records if r not in cancelled)
    windows = [orjson.loads(line) for line in (out / "windows.jsonl").read_bytes().splitlines()]
    assert [(w["scenario"], w.get("interrupted"), w["sent"]) for w in windows] == [
        ("first", True, 8)
    ]
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["interrupted"] == {"signal": signal.Signals(sig).name, "scenarios": ["first"]}
    assert summary["scenarios"][0]["errors"] == 4 and summary["scenarios"][0]["requests"] == 8
    assert "**Interrupted**" in (out / "report.md").read_text()
    again = cputax("report", str(out))
    assert again.returncode == 1 and "the run was interrupted by" in again.stderr


def test_an_old_run_with_an_html_scrape_and_a_connect_failure_is_analysed(tmp_path):
    """A run directory written before the client checked its scrapes: `cputax report` works,
    and a connect failure's kind keeps its URL (it was cut at the colon: `cannot connect to
    http`)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens there now
    (record,) = send_all(url, 1)
    record.scenario = "s"
    run = RunDir.create(tmp_path / "run")
    run.write_info(
        {
            "endpoint": url,
            "model": "m",
            "api": "chat",
            "server_metrics": True,
            "scenarios": [{"name": "s", "concurrency": 1, "context_tokens": 10, "batches": 1}],
        }
    )
    with JsonlWriter(run.requests) as writer:
        writer.write(record)
    with JsonlWriter(run.windows) as writer:
        writer.write(
            {"scenario": "s", "start_ns": record.t_start, "end_ns": record.t_end, "sent": 1}
        )
    for when in ("before", "after"):
        run.scrape("s", when).write_text("<html><body>sign in</body></html>")
    scenario = analyse(run).summary.scenarios[0]
    assert scenario.error_kinds == {f"cannot connect to {url}": 1}
    assert scenario.server is None
    assert report_cmd(tmp_path / "run") == 0 and (tmp_path / "run" / "report.md").exists()


def test_a_shard_killed_mid_scenario_loses_nothing_it_finished(tmp_path):
    """--client-procs 2, one shard killed by SIGKILL (the OOM killer's way) while its second
    batch is in flight: its finished requests are records, the report names it, and the
    next scenario runs."""
    import psutil

    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "o"
    with FaultServer({"/v1/chat/completions": probe_or(SLOW)}) as server:
        proc = start_run(server.url, profile, out, "--client-procs", "2")
        deadline = time.monotonic() + 240
        while len(server.measured()) < 8 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.5)
        parent = psutil.Process(proc.pid)
        shards = [c for c in parent.children() if c.cmdline() == parent.cmdline()]
        assert len(shards) == 2
        shards[-1].kill()
        _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1 and "Traceback" not in err, err
    records = read_requests(out / "requests.jsonl")
    first = [r for r in records if r.scenario == "first"]
    assert sorted(r.index for r in first if r.batch == 0) == [
        0,
        1,
        2,
        3,
    ]  # both shards' finished batch
    assert all(r.ok for r in first)
    assert len([r for r in records if r.scenario == "second"]) == 2  # the next scenario ran
    summary = orjson.loads((out / "summary.json").read_bytes())
    (line,) = summary["shard_failures"]
    assert "(killed by SIGKILL) after 2 finished requests; those are kept" in line
    assert "killed by SIGKILL" in (out / "report.md").read_text()
