"""The streaming path's own HTTP/1.1 client: asyncio sockets, httptools' parser, and the
kernel's receive stamp of every read.

Why not aiohttp here: aiohttp's stream reader merges what the socket delivered before
the application sees it, so a read cannot be tied to the segment, or the moment, its
bytes arrived in. This client reads with `recvmsg` on a socket with SO_TIMESTAMPNS,
so each read carries the time the kernel had its bytes (CLOCK_REALTIME, converted to the
monotonic clock by one offset, read again if the wall clock is set: `Clock`,
`Pool.to_monotonic`), independent of when the event loop
got round to it; the loop's own time is stamped too. A TCP segment can carry several
SSE events: each event gets the stamps of the read that completed it. aiohttp stays
for everything that is not timed (/v1/models, /tokenize, /metrics).

Plain HTTP only (loopback and the lab network); an https endpoint uses the aiohttp path
with the loop's stamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import httptools

__all__ = ["SEND_BUFFER", "SO_TIMESTAMPNS", "Clock", "Exchange", "ExchangeError", "Pool"]

SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD: same value on x86_64 and aarch64 (asm-generic)
SO_RCVBUFFORCE = 33  # as root: a receive buffer past net.core.rmem_max
# A receive buffer the kernel can keep filling while the loop is behind: bytes that arrive
# are stamped on arrival; with a full buffer the sender would wait, and the stamps with it.
RECEIVE_BUFFER = 4 << 20
# A send buffer that takes a whole request in one send(): the kernel's first one is 16 kB
# (net.ipv4.tcp_wmem), less than a 4k-token prompt, so a larger body waited for the
# server to read it inside the client's "serialize" (issue 17).
SEND_BUFFER = 4 << 20
SO_SNDBUFFORCE = 32  # as root: a send buffer past net.core.wmem_max
_TIMESPEC = struct.Struct("@qq")
_ANC = socket.CMSG_SPACE(_TIMESPEC.size)
# A 100k-token prompt echoed in an error, or a long SSE line, in few reads. Into one buffer
# the pool allocates once: `recvmsg(READ_SIZE)` would allocate (and, past malloc's mmap
# threshold, map and unmap) READ_SIZE bytes for every read, 17 us where the read is 3.
READ_SIZE = 1 << 18
CLOCK_TRIES = 64
# The offset is read again at least this often: a wall clock stepped back leaves no
# impossible stamp behind, so only a fresh reading finds it.
RECHECK_NS = 1_000_000_000


@dataclass(frozen=True)
class Clock:
    """CLOCK_REALTIME -> CLOCK_MONOTONIC: the offset between them, read once as the
    realtime between two monotonic reads with the narrowest gap; `error_ns` is half that
    gap (how far the conversion can be off, unless the wall clock is stepped meanwhile)."""

    offset_ns: int
    error_ns: int

    @classmethod
    def measure(cls, tries: int = CLOCK_TRIES) -> Clock:
        best = None
        for _ in range(tries):
            a = time.monotonic_ns()
            wall = time.time_ns()
            b = time.monotonic_ns()
            if best is None or b - a < best[0]:
                best = (b - a, wall - (a + b) // 2)
        assert best is not None
        return cls(offset_ns=best[1], error_ns=(best[0] + 1) // 2)

    def monotonic(self, realtime_ns: int) -> int:
        return realtime_ns - self.offset_ns

    def same_offset(self, other: Clock) -> bool:
        """Whether `other` read the same offset, within both readings' error."""
        return abs(other.offset_ns - self.offset_ns) <= self.error_ns + other.error_ns


class ExchangeError(Exception):
    """The connection failed: `kind` is "connect", "broken" (reset or closed mid-response)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Exchange:
    """What one request's response delivers, read by read: the subclass decides what to keep."""

    def on_headers(
        self, status: int, headers: dict[bytes, bytes], t_loop: int, t_kernel: int | None
    ) -> None:
        """The status line and headers are complete."""

    def on_body(self, data: bytes, t_loop: int, t_kernel: int | None) -> None:
        """Body bytes (de-chunked) of one read."""


class _Connection:
    """One keep-alive connection; one exchange at a time.

    The socket's reader callback does the work: it drains every read the kernel has,
    stamps it, and feeds httptools (which calls the exchange back) before it returns, so
    a read costs one callback and no task switch.
    """

    def __init__(
        self,
        sock: socket.socket,
        to_monotonic: Callable[[int, int], int],
        loop: asyncio.AbstractEventLoop,
        buffer: memoryview,
    ) -> None:
        self.sock = sock
        self._buffer = buffer  # the pool's: a read is fed (and copied out) before the next one
        self._to_monotonic = to_monotonic  # the pool's (it keeps one offset for all connections)
        self.loop = loop
        self._exchange: Exchange | None = None
        self._done: asyncio.Future[bool] | None = None
        self._t: tuple[int, int | None] = (0, None)
        self._headers: dict[bytes, bytes] = {}
        self._complete = False
        self._keep_alive = False
        self._error: BaseException | None = None
        self._got_any = False
        self._headers_seen = False
        self._pieces: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    # httptools callbacks: an exception here is kept and raised once the read is fed -----------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self._headers_seen = True
        try:
            self._exchange.on_headers(self._parser.get_status_code(), self._headers, *self._t)
        except Exception as exc:  # the exchange's own error (a StreamError)
            self._error = self._error or exc

    def on_body(self, body: bytes) -> None:
        # kept until the read is parsed: the exchange gets a read's body in one piece,
        # however many HTTP chunks (SSE events) it carried
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        # asked here: once the parser has moved past the message it no longer knows
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True

    # the exchange ----------------------------------------------------------------------------
    def alive(self) -> bool:
        """Idle and still open: the server may have closed a keep-alive connection since."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    async def exchange(
        self, request: bytes, sink: Exchange, on_sent: Callable[[int, int], None]
    ) -> bool:
        """Send `request`, feed the response to `sink`; True when the connection can be reused.
        on_sent(t_write, t_sent): when the write began, and when the kernel took its last byte."""
        self._exchange, self._headers, self._complete, self._error, self._got_any = (
            sink,
            {},
            False,
            None,
            False,
        )
        self._headers_seen = False
        self._pieces = []
        self._parser = httptools.HttpResponseParser(self)
        on_sent(*await self._send(request))
        self._done = self.loop.create_future()
        fd = self.sock.fileno()
        self.loop.add_reader(fd, self._on_readable)
        try:
            return await self._done
        finally:
            self.loop.remove_reader(fd)

    async def _send(self, data: bytes) -> tuple[int, int]:
        """Write all of `data`: (first send() call, the last byte taken), both stamped beside
        the system call, not when this task is resumed (a busy loop resumes it late, and the
        request would read as sent after its answer came; issue 17).

        The socket's send buffer (SEND_BUFFER) takes any prompt in one call; a write that
        waits is waiting for the server to read (its front end's time, docs/invariants.md).
        """
        view = memoryview(data)
        t_write = time.monotonic_ns()
        try:
            n = self.sock.send(view)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n == len(view):
            return t_write, time.monotonic_ns()
        view = view[n:]
        done: asyncio.Future[int] = self.loop.create_future()

        def writable() -> None:
            nonlocal view
            if done.done():
                return
            try:
                n = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                done.set_exception(exc)
                return
            view = view[n:]
            if not view:
                done.set_result(time.monotonic_ns())

        fd = self.sock.fileno()
        self.loop.add_writer(fd, writable)
        try:
            return t_write, await done
        finally:
            self.loop.remove_writer(fd)

    def _finish(self, result: bool | None = None, error: BaseException | None = None) -> None:
        done = self._done
        if done is None or done.done():
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(bool(result))

    def _on_readable(self) -> None:
        # One read takes all the kernel has queued (the buffer is large); only a full buffer
        # reads again. A read stamps the newest segment in it, and a read more per wake-up
        # would almost always find nothing: a system call and an exception for every chunk.
        # Bytes that arrive after the read wake the loop again (epoll is level-triggered).
        while True:
            try:
                size, anc, _, _ = self.sock.recvmsg_into([self._buffer], _ANC)
            except BlockingIOError:
                return
            except OSError as exc:
                self._finish(
                    error=ExchangeError(
                        "broken",
                        f"{type(exc).__name__}: {os.strerror(exc.errno or errno.ECONNRESET)}",
                    )
                )
                return
            t_loop = time.monotonic_ns()
            if not size:
                if self._close_delimited():
                    self._finish(False)  # the close was the body's end (no length given)
                    return
                self._finish(
                    error=ExchangeError(
                        "broken",
                        "the server closed the connection"
                        + (" before the response ended" if self._got_any else " before answering"),
                    )
                )
                return
            self._got_any = True
            more = size == len(self._buffer)
            self._t = (t_loop, self._kernel(anc, t_loop))
            try:
                self._parser.feed_data(self._buffer[:size])
            except httptools.HttpParserError as exc:
                if self._error is None:
                    self._error = ExchangeError("broken", f"bad HTTP response: {exc}")
            if self._pieces and self._error is None:
                body = self._pieces[0] if len(self._pieces) == 1 else b"".join(self._pieces)
                self._pieces.clear()
                try:
                    self._exchange.on_body(body, *self._t)
                except Exception as exc:  # the exchange's own error (a StreamError)
                    self._error = exc
            if self._error is not None:
                self._finish(error=self._error)
                return
            if self._complete:
                self._finish(self._keep_alive)
                return
            if not more:
                return

    def _close_delimited(self) -> bool:
        """Headers came with neither Content-Length nor chunking: the body ends at the close
        (RFC 9112 6.3; what httptools' missing feed_eof would say). curl accepts it too."""
        if not self._headers_seen or self._complete:
            return False
        headers = self._headers
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        return b"content-length" not in headers and not chunked

    def _kernel(self, anc: list[tuple[int, int, bytes]], t_loop: int) -> int | None:
        for level, kind, data in anc:
            if (
                level == socket.SOL_SOCKET
                and kind == SO_TIMESTAMPNS
                and len(data) >= _TIMESPEC.size
            ):
                sec, nsec = _TIMESPEC.unpack_from(data)
                return self._to_monotonic(sec * 1_000_000_000 + nsec, t_loop)
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Pool:
    """Keep-alive connections to one host, at most `limit` at a time."""

    def __init__(
        self,
        host: str,
        port: int,
        limit: int,
        clock: Clock | None = None,
        recheck_ns: int = RECHECK_NS,
    ) -> None:
        self.host, self.port = host, port
        self.clock = clock or Clock.measure()
        self.clock_steps = 0  # times the offset was found changed: the wall clock was set meanwhile
        self._recheck_ns = recheck_ns
        self._checked_ns = time.monotonic_ns()
        self._idle: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self.kernel_stamps = True  # False once a socket refused SO_TIMESTAMPNS
        self.connects = (
            0  # connections opened (keep-alive working: about `limit`, not one per request)
        )
        self._buffer = memoryview(bytearray(READ_SIZE))

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for options, size in (
                ((SO_RCVBUFFORCE, socket.SO_RCVBUF), RECEIVE_BUFFER),
                ((SO_SNDBUFFORCE, socket.SO_SNDBUF), SEND_BUFFER),
            ):
                for option in options:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, option, size)
                        break
                    except OSError:
                        continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self.kernel_stamps = False
            self.connects += 1
            return _Connection(sock, self.to_monotonic, loop, self._buffer)
        reason = os.strerror(last.errno) if last is not None and last.errno else str(last)
        raise ExchangeError("connect", reason)

    def to_monotonic(self, realtime_ns: int, t_loop: int) -> int:
        """A kernel stamp on the monotonic clock, for a read the loop stamped `t_loop`.

        The two clocks' offset changes only when the wall clock is set (NTP's step, a
        virtual machine's time sync after a pause; a slew moves both clocks alike). The
        kernel had the bytes before the loop read them, so a stamp later than the read
        means the wall clock was set ahead since the offset was read: it is read again and
        the stamp converted with it. A clock set back shows no such sign; the offset is
        read again at least every `recheck_ns` for that.
        """
        t = realtime_ns - self.clock.offset_ns
        if t > t_loop + self.clock.error_ns or t_loop - self._checked_ns >= self._recheck_ns:
            fresh = Clock.measure()
            self._checked_ns = time.monotonic_ns()
            if not self.clock.same_offset(fresh):
                self.clock_steps += 1
                self.clock = fresh
            elif fresh.error_ns < self.clock.error_ns:
                self.clock = fresh
            t = realtime_ns - self.clock.offset_ns
        return t

    async def open(self, count: int) -> None:
        """Open connections until `count` are idle (before a scenario's clock starts: a
        connect inside the first batch would be counted in its requests' serialize)."""
        while len(self._idle) < count:
            self._idle.append(await self._connect())

    async def request(
        self, request: bytes, sink: Exchange, on_sent: Callable[[int, int], None]
    ) -> None:
        """One exchange on a pooled (or new) connection."""
        async with self._slots:
            conn = None
            while self._idle:
                candidate = self._idle.pop()
                if candidate.alive():
                    conn = candidate
                    break
                candidate.close()
            if conn is None:
                conn = await self._connect()
            reuse = False
            try:
                reuse = await conn.exchange(request, sink, on_sent)
            finally:
                if reuse:
                    self._idle.append(conn)
                else:
                    conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()
