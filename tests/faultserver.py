"""A server that misbehaves on purpose, byte by byte, for the fault tests (test_faults.py).

The calibration stub (cputax.targets.stub) breaks streams the ways aiohttp lets it; this
one writes raw bytes on a socket, so it can also do what aiohttp never would: a body
that ends at the close, 1-byte writes, bare-CR line endings, 10 MB of headers, a reset
before answering, an endpoint that never answers. Every path answers with a `Reply`
(a coroutine given the socket's writer and the request); `FaultServer.chat_bodies`
keeps every chat request's body, so a test can check that each one sent is a record.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

__all__ = [
    "FaultServer",
    "Reply",
    "answer",
    "chunk",
    "events",
    "hang",
    "probe_or",
    "reset",
    "stream",
]

Reply = Callable[
    [asyncio.StreamWriter, dict[str, Any]], Awaitable[bool]
]  # True: keep the connection
MODEL = "fault-model"


def chunk(obj: Any) -> bytes:
    """One SSE event carrying `obj` as JSON."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def events(tokens: int = 3, usage: bool = True, done: bool = True) -> list[bytes]:
    """A well-formed chat stream as vLLM sends it: role chunk, tokens, usage, [DONE]."""
    head = {"id": "chatcmpl-fault", "object": "chat.completion.chunk", "model": MODEL}
    out = [
        chunk({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    ]
    for k in range(tokens):
        out.append(
            chunk(
                {
                    **head,
                    "choices": [
                        {
                            "index": 0,
                            "delta": {"content": f" w{k}"},
                            "finish_reason": "length" if k == tokens - 1 else None,
                        }
                    ],
                }
            )
        )
    if usage:
        out.append(
            chunk(
                {**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": tokens}}
            )
        )
    if done:
        out.append(b"data: [DONE]\n\n")
    return out


def answer(
    status: int,
    body: bytes | Any,
    content_type: str = "application/json",
    *,
    length: bool = True,
    extra: bytes = b"",
) -> Reply:
    """A whole response: with Content-Length, or (length=False) ended by the close."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)

    async def reply(writer: asyncio.StreamWriter, request: dict[str, Any]) -> bool:
        head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n".encode() + extra
        head += f"Content-Length: {len(raw)}\r\n".encode() if length else b"Connection: close\r\n"
        writer.write(head + b"\r\n" + raw)
        await writer.drain()
        return length

    return reply


def stream(
    parts: list[bytes] | Callable[[dict[str, Any]], list[bytes]],
    *,
    framing: str = "chunked",
    newline: bytes = b"\n",
    piece: int | None = None,
    end: str = "done",
    delay_s: float = 0.0,
    version: str = "1.1",
    status: int = 200,
    headers: bytes = b"",
) -> Reply:
    """An SSE response. framing: "chunked", "length" (Content-Length) or "close" (the body
    ends at the close, no length: HTTP/1.0 and Python's http.server do this). `newline`
    replaces each "\\n"; `piece` writes that many bytes at a time; `delay_s` waits before
    each event; end: "done" (the response ends as framed), "close" (a clean close after
    the parts) or "reset" (a TCP reset after them)."""

    async def reply(writer: asyncio.StreamWriter, request: dict[str, Any]) -> bool:
        items = parts(request) if callable(parts) else parts
        items = [p.replace(b"\n", newline) for p in items]
        head = (
            f"HTTP/{version} {status} OK\r\nContent-Type: text/event-stream\r\n".encode() + headers
        )
        if framing == "chunked":
            head += b"Transfer-Encoding: chunked\r\n"
        elif framing == "length":
            head += f"Content-Length: {sum(map(len, items))}\r\n".encode()
        writer.write(head + b"\r\n")
        for item in items:
            if delay_s:
                await asyncio.sleep(delay_s)
            data = b"%x\r\n%s\r\n" % (len(item), item) if framing == "chunked" else item
            for k in range(0, len(data), piece or len(data) or 1):
                writer.write(data[k : k + (piece or len(data))])
                await writer.drain()
        if end == "reset":
            _reset(writer)
            return False
        if framing == "chunked" and end == "done":
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return end == "done" and framing != "close"

    return reply


def hang() -> Reply:
    """Never answer (until the server stops)."""

    async def reply(writer: asyncio.StreamWriter, request: dict[str, Any]) -> bool:
        await asyncio.Event().wait()
        return False

    return reply


def reset() -> Reply:
    """A TCP reset instead of an answer."""

    async def reply(writer: asyncio.StreamWriter, request: dict[str, Any]) -> bool:
        _reset(writer)
        return False

    return reply


def probe_or(other: Reply, probe: Reply | None = None) -> Reply:
    """`other` for the run's requests; a good answer (or `probe`) for the probes (max_tokens 1)."""
    good = probe or stream(events(1))

    async def reply(writer: asyncio.StreamWriter, request: dict[str, Any]) -> bool:
        body = request.get("json") or {}
        return await (good if body.get("max_tokens") == 1 else other)(writer, request)

    return reply


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:  # linger 0: the close sends RST, not FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _models() -> Reply:
    return answer(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})


class FaultServer:
    """Serve `routes` (path -> Reply) on 127.0.0.1 from a thread, for a `with` block; `.url`.

    Unlisted paths: /v1/models lists MODEL, /v1/chat/completions streams three tokens,
    anything else is 404.
    """

    def __init__(self, routes: dict[str, Reply] | None = None) -> None:
        self.routes = {
            "/v1/models": _models(),
            "/v1/chat/completions": stream(events()),
            **(routes or {}),
        }
        self.url = ""
        self.chat_bodies: list[dict[str, Any]] = []
        self.headers_seen: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def measured(self) -> list[dict[str, Any]]:
        """The chat requests that were not probes (max_tokens 1)."""
        return [b for b in self.chat_bodies if b.get("max_tokens") != 1]

    def __enter__(self) -> FaultServer:
        ready = threading.Event()

        async def main() -> None:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=1 << 26)
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
            ready.set()
            async with server:
                await self._stop.wait()
                server.close()
                for task in asyncio.all_tasks() - {asyncio.current_task()}:
                    task.cancel()

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), daemon=True, name="fault-server"
        )
        self._thread.start()
        ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop serving (also mid-response: a server that dies); once, however often called."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                line, _, rest = head.partition(b"\r\n")
                method, path = line.split(b" ")[:2]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (h.partition(b":") for h in rest.split(b"\r\n") if h)
                }
                self.headers_seen.append(headers.get(b"authorization", b""))
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                request: dict[str, Any] = {
                    "method": method.decode(),
                    "path": path.decode(),
                    "headers": headers,
                }
                try:
                    request["json"] = orjson.loads(body) if body else None
                except orjson.JSONDecodeError:
                    request["json"] = None
                route = request["path"].split("?")[0]
                if route == "/v1/chat/completions" and isinstance(request["json"], dict):
                    self.chat_bodies.append(request["json"])
                reply = self.routes.get(route) or answer(404, {"detail": "Not Found"})
                if not await reply(writer, request):
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()
