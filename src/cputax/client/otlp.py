"""An OTLP/HTTP trace receiver for the run: the server's per-request spans into spans.jsonl.

vLLM posts one span per finished request (`--otlp-traces-endpoint URL` with
OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf). The receiver is a small threaded HTTP
server (on loopback unless the user's server is elsewhere) that decodes each export with
opentelemetry-proto and appends one JSON line per span, flushed per post: a crash loses
nothing received. Analysis (analysis.server_phases) joins the lines to requests.jsonl by
trace id / request id; nothing here interprets a span.

The exporter batches: a span arrives up to the exporter's schedule delay after its
request ended, so `SpanMonitor.stop` waits that long past the last scenario.
"""

from __future__ import annotations

import gzip
import multiprocessing
import signal
import threading
import time
import zlib
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cputax.client.wire import Clock
from cputax.errors import CputaxError
from cputax.records import JsonlWriter
from cputax.rundir import RunDir

__all__ = ["ReceiverProcess", "SpanMonitor", "SpanReceiver", "parse_listen", "span_dicts"]

MAX_BODY = 64 << 20  # a batch of 512 spans is about 300 KiB
QUIET_S = 0.5  # no post for this long after the wait: the exporter has flushed


def _value(value: Any) -> Any:
    """An OTLP AnyValue as plain JSON."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def span_dicts(body: bytes) -> list[dict[str, Any]]:
    """The spans of one ExportTraceServiceRequest (protobuf), one dict each; times are the
    span's own (wall clock, ns since the epoch)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        process = resource.get("vllm.process_id") or resource.get("process.pid")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    {
                        "name": span.name,
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex() or None,
                        "kind": int(span.kind),
                        "start_unix_ns": int(span.start_time_unix_nano),
                        "end_unix_ns": int(span.end_time_unix_nano),
                        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
                        "process": process,
                    }
                )
    return spans


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT (or [v6]:PORT) of --otlp-listen; CputaxError naming the form otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise CputaxError(f"--otlp-listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4318")
    return host, int(port)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the exporter keeps one connection
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, MAX_BODY))
        status, answer = self.server.receiver.take(
            body, self.headers.get("Content-Encoding", ""), self.headers.get("Content-Type", "")
        )
        self.send_response(status)
        self.send_header(
            "Content-Type", "application/x-protobuf" if status == 200 else "text/plain"
        )
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass  # the run's console is the progress bars'; counts go to run.json


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    receiver: SpanReceiver


class SpanReceiver:
    """Receives OTLP/HTTP trace exports on host:port (port 0: a free one) into `path`."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.path = path
        self.host, self.port = host, port
        self.spans = 0
        self.posts = 0
        self.refused = 0  # posts that were not OTLP protobuf
        self.last_ns: int | None = None  # monotonic time of the last post with spans
        self.clock: Clock | None = (
            None  # wall -> monotonic, read at start: the spans' times are wall
        )
        self._lock = threading.Lock()
        self._writer: JsonlWriter | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        """The URL to give the server's exporter (vLLM takes it whole, path included)."""
        return _endpoint(self.host, self.port)

    def start(self) -> SpanReceiver:
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as exc:
            raise CputaxError(
                f"cannot listen for spans on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from exc
        server.receiver = self
        self._server = server
        self.port = server.server_address[1]
        self._writer = JsonlWriter(self.path)
        self.clock = Clock.measure()
        self._thread = threading.Thread(
            target=server.serve_forever, name="cputax-otlp", daemon=True
        )
        self._thread.start()
        return self

    def take(self, body: bytes, encoding: str, content_type: str) -> tuple[int, bytes]:
        """One post: (HTTP status, answer body). Its spans are on disk when it returns."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        received = time.monotonic_ns()
        try:
            if "json" in content_type:
                raise ValueError(
                    "OTLP/JSON is not read: set OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf"
                )
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            spans = span_dicts(body)
        except Exception as exc:  # a bad post must not stop the receiver: it is counted
            with self._lock:
                self.refused += 1
            return 400, f"cputax: not an OTLP protobuf trace export: {exc}".encode()
        with self._lock:
            self.posts += 1
            if spans and self._writer is not None:
                for span in spans:
                    span["received_ns"] = received
                    self._writer.write(span)
                self.spans += len(spans)
                self.last_ns = received
        return 200, ExportTraceServiceResponse().SerializeToString()

    def wait_quiet(self, since_ns: int, delay_s: float, timeout_s: float) -> None:
        """Until the exporter has had `delay_s` past `since_ns` (its batch delay) and then
        posted nothing for QUIET_S, or `timeout_s` passed."""
        _wait_quiet(lambda: self.last_ns, since_ns, delay_s, timeout_s)

    def stop(self) -> dict[str, Any]:
        """Stop listening, close the file; what run.json keeps of the receiver."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        clock = self.clock
        return {
            "endpoint": self.endpoint,
            "spans": self.spans,
            "posts": self.posts,
            "refused": self.refused,
            "clock": None
            if clock is None
            else {"offset_ns": clock.offset_ns, "error_ns": clock.error_ns},
        }


def _endpoint(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/v1/traces"


def _wait_quiet(
    last_ns: Callable[[], int | None], since_ns: int, delay_s: float, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.monotonic_ns()
        if now - since_ns >= delay_s * 1e9 and now - (last_ns() or 0) >= QUIET_S * 1e9:
            return
        time.sleep(0.05)


def _serve(path: str, host: str, port: int, conn: Any) -> None:
    """A SpanReceiver in a process of its own, answering the parent over `conn`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent stops us
    try:
        receiver = SpanReceiver(Path(path), host, port).start()
    except CputaxError as exc:
        conn.send(("error", str(exc)))
        return
    conn.send(("port", receiver.port))
    try:
        while True:
            if conn.recv() == "stop":
                conn.send(receiver.stop())
                return
            conn.send((receiver.spans, receiver.last_ns))
    except (EOFError, OSError):  # the parent is gone
        receiver.stop()


class ReceiverProcess:
    """A SpanReceiver with the same face, run in a child process: decoding an export and
    writing its lines holds the GIL for milliseconds, and in the client's process that
    put its event loop's reads more than 5 ms behind the kernel's stamps (issue 17's
    checks broke on the emulated GPU, a post a second)."""

    def __init__(self, path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.path = path
        self.host, self.port = host, port
        self._proc: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()
        self._result: dict[str, Any] | None = None

    @property
    def endpoint(self) -> str:
        return _endpoint(self.host, self.port)

    def start(self) -> ReceiverProcess:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(str(self.path), self.host, self.port, child),
            name="cputax-otlp",
            daemon=True,
        )
        self._proc.start()
        child.close()
        if not self._conn.poll(60):
            self._proc.kill()
            raise CputaxError("the span receiver did not start within 60 s")
        answer = self._conn.recv()
        if answer[0] == "error":
            self._proc.join()
            raise CputaxError(answer[1])
        self.port = answer[1]
        return self

    def _state(self) -> tuple[int, int | None]:
        if self._result is not None:
            return self._result["spans"], None
        with self._lock:
            self._conn.send("state")
            return self._conn.recv()

    @property
    def spans(self) -> int:
        return self._state()[0]

    @property
    def last_ns(self) -> int | None:
        return self._state()[1]

    def wait_quiet(self, since_ns: int, delay_s: float, timeout_s: float) -> None:
        _wait_quiet(lambda: self.last_ns, since_ns, delay_s, timeout_s)

    def stop(self) -> dict[str, Any]:
        """Stop the child (idempotent); what run.json keeps of the receiver."""
        if self._result is None and self._proc is not None:
            with self._lock:
                try:
                    self._conn.send("stop")
                    self._result = self._conn.recv() if self._conn.poll(30) else None
                except (EOFError, OSError):
                    self._result = None
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
            if self._result is None:
                self._result = {
                    "endpoint": self.endpoint,
                    "spans": 0,
                    "posts": 0,
                    "refused": 0,
                    "clock": None,
                    "lost": "the receiver died",
                }
        return dict(self._result or {})


class SpanMonitor:
    """The receiver as a session Monitor: at stop it waits for the spans still batched in
    the server's exporter, then closes; run.json gets its counts under `otlp`.

    `expect` (the server was started with tracing) makes it wait even when no span came.
    """

    name = "otlp"

    def __init__(
        self, receiver: SpanReceiver | ReceiverProcess, export_delay_ms: int, expect: bool
    ) -> None:
        self.receiver = receiver
        self.export_delay_ms = export_delay_ms
        self.expect = expect
        self._last_end = time.monotonic_ns()

    def start(self, run: RunDir, target: dict[str, Any]) -> None:
        pass  # listening since before the server started

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        pass

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        self._last_end = t_ns

    def stop(self) -> dict[str, Any]:
        if self.expect or self.receiver.spans:
            delay_s = self.export_delay_ms / 1000 + 1.0
            self.receiver.wait_quiet(self._last_end, delay_s, timeout_s=delay_s + 10.0)
        return {**self.receiver.stop(), "export_delay_ms": self.export_delay_ms}
