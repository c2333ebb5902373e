"""One streamed request -> one RequestRecord.

The streaming request goes through cputax's own HTTP/1.1 client (client.wire): every
read carries the kernel's receive stamp as well as the loop's, and costs one callback.
An https endpoint, and everything that is not timed (/v1/models, /tokenize,
/metrics), goes through aiohttp. One `StreamingClient` owns one connection pool of
each per event loop, opened in `__aenter__`: a connection per request would pay a TCP
connect each time and be blamed on the server. Timestamps are `time.monotonic_ns()`,
the clock every process on the host shares, so the server's own timestamps (the stub's
truth, py-spy, telemetry) line up.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from cputax.client.sse import StreamError, StreamParser, error_message
from cputax.client.wire import Clock, Exchange, ExchangeError, Pool
from cputax.errors import CputaxError
from cputax.records import RequestRecord

PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
# aiohttp's defaults (256 KiB read buffer, 8 KiB header lines) are sized for web
# pages; a 100k-token prompt echoed in an error or a long SSE line needs more.
READ_BUFSIZE = 4 << 20
MAX_HEADER_LINE = 64 << 10
JSON_HEADERS = {"Content-Type": "application/json"}
ERROR_SHOWN = 300  # characters of a server's error message kept in the record
REDACTED = "[api key]"  # what the API key becomes in anything cputax keeps


def new_request_id() -> str:
    """A fresh join key: 128 random bits as 32 hex digits, the form of a W3C trace id, so
    one value is both the X-Request-Id and the trace id (unique across processes and hosts,
    as load shards need, with no coordination)."""
    return os.urandom(16).hex()


def trace_headers(request_id: str) -> dict[str, str]:
    """X-Request-Id and a W3C traceparent whose trace id is the request id: the server's
    span of the request (its child) carries the id either way. The parent span id is
    random; flags 01 (sampled)."""
    return {"X-Request-Id": request_id, "traceparent": f"00-{request_id}-{os.urandom(8).hex()}-01"}


def _truncate(text: str, limit: int = ERROR_SHOWN) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


async def _mark_sent(session: Any, ctx: SimpleNamespace, params: Any) -> None:
    """Trace hook: headers or a body chunk is being handed to the socket; the last one is t_sent.

    aiohttp calls it just before the write, and a body within the kernel's
    socket buffer is written synchronously, so this is when the body left us.
    """
    record = ctx.trace_request_ctx
    if isinstance(record, RequestRecord):
        record.t_sent = time.monotonic_ns()


async def _within(coro: Any, seconds: float) -> Any:
    """`coro` with a time limit, in this task. asyncio.wait_for (before Python 3.12) runs it
    as a new task, a loop turn later: every request of a batch was built before the first
    was written, and each one's serialize held the others' writes (issue 17)."""
    if hasattr(asyncio, "timeout"):  # 3.11+
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)


def _connect_reason(exc: aiohttp.ClientConnectorError) -> str:
    errno = exc.os_error.errno
    return os.strerror(errno) if errno else str(exc.os_error) or type(exc.os_error).__name__


def _error_text(raw: bytes) -> str:
    """The message of an HTTP error body: the JSON error's message if there is one, else
    the text."""
    try:
        message = error_message(orjson.loads(raw))
    except orjson.JSONDecodeError:
        message = None
    return _truncate(message if message is not None else raw.decode("utf-8", "replace"))


def check_endpoint(endpoint: str) -> str:
    """The base URL without its trailing slash; CputaxError when it cannot be one."""
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise CputaxError(
            f"--endpoint {endpoint!r}: expected a base URL such as http://127.0.0.1:8000"
        )
    try:
        url.port  # noqa: B018 (urlsplit checks the port only when asked)
    except ValueError as exc:
        raise CputaxError(f"--endpoint {endpoint!r}: {exc}") from None
    return endpoint.rstrip("/")


class _RecordExchange(Exchange):
    """One streamed response into its RequestRecord, read by read, with both stamps."""

    def __init__(self, record: RequestRecord, api: str, keep_chunks: bool) -> None:
        self.record = record
        self.parser = StreamParser(record, api, keep_chunks=keep_chunks)
        self.error_body: list[bytes] | None = None  # an HTTP error's body, collected

    def on_headers(
        self, status: int, headers: dict[bytes, bytes], t_loop: int, t_kernel: int | None
    ) -> None:
        record = self.record
        record.t_headers, record.t_headers_kernel, record.status = t_loop, t_kernel, status
        if status >= 400:
            self.error_body = []
            return
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        if not content_type.startswith("text/event-stream"):
            raise StreamError(
                f"expected a text/event-stream response, got {content_type or 'no content type'!r}"
            )

    def on_body(self, data: bytes, t_loop: int, t_kernel: int | None) -> None:
        if self.error_body is not None:
            self.error_body.append(data)
            return
        start = time.monotonic_ns()
        try:
            self.parser.feed(data, t_loop, t_kernel)
        finally:
            # the monotonic clock, not the thread's CPU clock: that one is a system call
            # (about 1 us here, more than parsing a chunk), this one is not
            self.record.parse_s += (time.monotonic_ns() - start) / 1e9


class StreamingClient:
    """Streams chat or completions requests to an OpenAI-compatible server and times each one.

    `keep_chunks` records every token chunk's stamps in record.extra["token_ns"]
    (calibration; a run does not need them). `wire=False` streams through aiohttp even
    for plain HTTP, with the loop's stamps only: the peer benchmark's comparison of the two.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        api: str = "chat",
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 1024,
        keep_chunks: bool = False,
        wire: bool = True,
    ):
        if api not in PATHS:
            raise CputaxError(f"api must be one of {', '.join(PATHS)}, got {api!r}")
        self.endpoint = check_endpoint(endpoint)
        self.api = api
        self.timeout_s = timeout_s
        self.keep_chunks = keep_chunks
        self.wire = wire
        self._url = self.endpoint + PATHS[api]
        self._key = api_key
        # The key lives in the session's default headers only: never in a record or a URL.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None
        self._pool: Pool | None = None
        self._head = b""
        self._clock = Clock.measure()
        self._clock_steps = 0

    def like(self, max_connections: int | None = None) -> StreamingClient:
        """A new, unopened client with these settings (a load shard's, in its own process)."""
        return StreamingClient(
            self.endpoint,
            api=self.api,
            api_key=self._key,
            timeout_s=self.timeout_s,
            max_connections=max_connections or self._max_connections,
            keep_chunks=self.keep_chunks,
            wire=self.wire,
        )

    async def __aenter__(self) -> StreamingClient:
        trace = aiohttp.TraceConfig()
        trace.on_request_headers_sent.append(_mark_sent)
        trace.on_request_chunk_sent.append(_mark_sent)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            trace_configs=[trace],
            headers=self._auth,
            read_bufsize=READ_BUFSIZE,
            max_line_size=MAX_HEADER_LINE,
            max_field_size=MAX_HEADER_LINE,
        )
        url = urlsplit(self._url)
        if self.wire and url.scheme == "http" and url.hostname:
            self._pool = Pool(url.hostname, url.port or 80, self._max_connections, self._clock)
            host = url.netloc.encode()
            auth = b"".join(f"{k}: {v}\r\n".encode() for k, v in self._auth.items())
            self._head = (
                b"POST "
                + (url.path or "/").encode()
                + b" HTTP/1.1\r\nHost: "
                + host
                + (
                    b"\r\nUser-Agent: cputax\r\nAccept: text/event-stream\r\n"
                    b"Content-Type: application/json\r\n"
                )
                + auth
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            self._pool.close()
            self._clock, self._clock_steps = (
                self._pool.clock,
                self._clock_steps + self._pool.clock_steps,
            )
            self._pool = None

    async def open_connections(self, count: int) -> None:
        """Have `count` streaming connections open and idle (the streaming path's pool)."""
        if self._pool is not None:
            await self._pool.open(min(count, self._max_connections))

    @property
    def clock(self) -> Clock:
        """The realtime -> monotonic conversion of the kernel's stamps, as last read."""
        return self._pool.clock if self._pool is not None else self._clock

    @property
    def clock_steps(self) -> int:
        """Times the wall clock was found set during the run (the conversion was read again)."""
        return self._clock_steps + (self._pool.clock_steps if self._pool is not None else 0)

    @property
    def kernel_stamps(self) -> bool:
        """Whether records get the kernel's receive stamps (plain HTTP, and the socket took
        SO_TIMESTAMPNS)."""
        return self._pool is not None and self._pool.kernel_stamps

    @property
    def connections_opened(self) -> int:
        """Connections the streaming path opened so far (keep-alive: about max_connections)."""
        return self._pool.connects if self._pool is not None else 0

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use StreamingClient as `async with StreamingClient(...) as client`")
        return self._session

    async def send(self, record: RequestRecord, build: Callable[[], dict]) -> RequestRecord:
        """Fill `record` by building the payload with build() (timed), forcing stream=True and
        stream_options.include_usage=True, posting it and reading the stream.

        Never raises for HTTP, stream or timeout errors: it sets ok=False and a
        clear `error`; the record always comes back with t_end set.
        """
        record.ok = False
        record.request_id = record.request_id or new_request_id()
        record.t_start = time.monotonic_ns()
        cpu = time.thread_time_ns()
        payload = build()
        payload = {
            **payload,
            "stream": True,
            "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True},
        }
        body = orjson.dumps(payload)
        record.build_s = (time.thread_time_ns() - cpu) / 1e9
        try:
            if self._pool is not None:
                await _within(self._stream_wire(record, body), self.timeout_s)
            else:
                await self._stream(record, body)
        except StreamError as exc:
            record.error = str(exc)
        except ExchangeError as exc:
            record.error = (
                f"cannot connect to {self.endpoint}: {exc}"
                if exc.kind == "connect"
                else f"connection broken mid-stream: {_truncate(str(exc))}"
            )
        except asyncio.TimeoutError:
            record.error = f"timed out after {self.timeout_s:g} s (per-request timeout)"
        except aiohttp.ClientConnectorError as exc:
            record.error = f"cannot connect to {self.endpoint}: {_connect_reason(exc)}"
        except aiohttp.ClientPayloadError as exc:
            record.error = f"connection broken mid-stream: {_truncate(str(exc))}"
        except (aiohttp.ClientError, OSError) as exc:
            record.error = f"connection error: {type(exc).__name__}: {_truncate(str(exc))}"
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        except Exception as exc:  # a fault nobody foresaw is this request's error, never the run's
            record.error = f"client error: {type(exc).__name__}: {_truncate(str(exc))}"
        finally:
            record.t_end = time.monotonic_ns()
            if record.error is not None:
                record.ok = False
                if self._key and self._key in record.error:  # a server that echoes the header
                    record.error = self.redact(record.error)
        return record

    def redact(self, text: str) -> str:
        """`text` without the API key (what a server echoes never reaches a file)."""
        return text.replace(self._key, REDACTED) if self._key else text

    async def _stream_wire(self, record: RequestRecord, body: bytes) -> None:
        assert self._pool is not None
        sink = _RecordExchange(record, self.api, self.keep_chunks)

        def sent(t_write: int, t_taken: int) -> None:
            # sent = the write began: on loopback the server may run its whole front end
            # inside the send (2 cores), and a preemption between the send and a stamp after
            # it would put the request after its own answer; the write's time is write_s,
            # and a write that waits is the server not reading yet (front-end time)
            record.t_sent = t_write
            record.write_s = (t_taken - t_write) / 1e9

        ids = trace_headers(record.request_id or new_request_id())
        head = self._head + "".join(f"{k}: {v}\r\n" for k, v in ids.items()).encode()
        length = b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        await self._pool.request(head + length + body, sink, sent)
        if sink.error_body is not None:
            raise StreamError(f"HTTP {record.status}: {_error_text(b''.join(sink.error_body))}")
        sink.parser.eof(time.monotonic_ns())
        record.ok = True

    async def _stream(self, record: RequestRecord, body: bytes) -> None:
        headers = {**JSON_HEADERS, **trace_headers(record.request_id or new_request_id())}
        async with self.session.post(
            self._url, data=body, headers=headers, trace_request_ctx=record
        ) as resp:
            record.t_headers = time.monotonic_ns()
            record.status = resp.status
            if resp.status >= 400:
                raise StreamError(f"HTTP {resp.status}: {_error_text(await resp.read())}")
            content_type = resp.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                raise StreamError(
                    "expected a text/event-stream response, got "
                    f"{content_type or 'no content type'!r}"
                )
            parser = StreamParser(record, self.api, keep_chunks=self.keep_chunks)
            async for data in resp.content.iter_any():
                t = time.monotonic_ns()
                try:
                    parser.feed(data, t)
                finally:
                    record.parse_s += (time.monotonic_ns() - t) / 1e9
            parser.eof(time.monotonic_ns())
            record.ok = True

    async def get_json(self, path: str) -> Any:
        """GET a JSON document (e.g. /v1/models); CputaxError if the server fails or answers
        non-2xx."""
        status, raw = await self._request("GET", path)
        if status >= 300:
            raise CputaxError(f"GET {self.endpoint}{path}: HTTP {status}: {_error_text(raw)}")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CputaxError(f"GET {self.endpoint}{path}: not JSON ({exc})") from exc

    async def post_json(self, path: str, obj: Any) -> tuple[int, Any]:
        """POST JSON (e.g. /tokenize); returns (status, parsed JSON, or the text if not JSON)."""
        status, raw = await self._request("POST", path, orjson.dumps(obj))
        try:
            return status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return status, raw.decode("utf-8", "replace")

    async def get_text(self, path: str) -> tuple[int, str]:
        """GET a text document (e.g. /metrics)."""
        status, raw = await self._request("GET", path)
        return status, raw.decode("utf-8", "replace")

    async def _request(
        self, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        url = self.endpoint + path
        try:
            async with self.session.request(method, url, data=body, headers=JSON_HEADERS) as resp:
                raw = await resp.read()
                key = self._key.encode() if self._key else b""
                if key and key in raw:
                    raw = raw.replace(key, REDACTED.encode())
                return resp.status, raw
        except aiohttp.ClientConnectorError as exc:
            raise CputaxError(f"cannot connect to {self.endpoint}: {_connect_reason(exc)}") from exc
        except asyncio.TimeoutError as exc:
            raise CputaxError(f"{method} {url}: timed out after {self.timeout_s:g} s") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise CputaxError(
                f"{method} {url}: {type(exc).__name__}: {_truncate(str(exc))}"
            ) from exc
