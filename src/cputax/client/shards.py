"""Load generation in N processes: each shard has its own event loop and a share of the streams.

One event loop stamps a token when it gets round to it; past about a hundred busy
streams it gets round to them late (`cputax calibrate` shows where). The shards are
forked from the run's process after the scenario's prompts are prepared, so each one
inherits the tokenizer and the prompts and opens its own connections
(StreamingClient.like). The arrival process is cut by loadgen.Share; all shards start
at one moment on the monotonic clock, and between closed-loop batches they wait for
each other through the parent (a batch ends when every shard's part of it has).

Each shard sends its finished records to the parent over a pipe, one line each, as
they finish; the parent writes them to requests.jsonl at once, so a shard that dies
loses only its requests in flight, and the parent names it and its exit (signal or
error) in `ShardedWindow.failures`. Linux only (fork).

The lines a shard writes: `R+<record json>` / `R-<record json>` (ok / failed), `B <batch>`
(done with its part of a batch), `E <window json>` (finished: its window and the times it
found the wall clock set), `X <message>` (failed).
The parent writes `G <start_ns>` (go), `G <batch>` (every shard finished that batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cputax.client.heap import steady_heap
from cputax.client.loadgen import Share, Window
from cputax.client.stream import StreamingClient
from cputax.errors import CputaxError
from cputax.records import RequestRecord

__all__ = ["STREAMS_PER_PROC", "ShardedWindow", "ShardWork", "auto_procs", "run_sharded"]

STREAMS_PER_PROC = 128  # streams one loop keeps within a millisecond here (cputax calibrate)
START_DELAY_S = 0.1  # from "go" to the common start: every shard's loop is waiting by then
MAX_PROCS = 16
STOP_S = 10.0  # an interrupted shard's time to send its cancelled records

# what one shard runs: (its client, its share, the common start, on_record, barrier) -> its Window
ShardWork = Callable[
    [
        StreamingClient,
        Share,
        int,
        Callable[[RequestRecord], None],
        Callable[[int], Awaitable[None]],
    ],
    Awaitable[Window],
]


def auto_procs(streams: int, cpus: int | None = None) -> int:
    """The default --client-procs: one per STREAMS_PER_PROC streams, at most a quarter of
    the CPUs (the server and the monitors need the rest) and MAX_PROCS; 1 below that."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(math.ceil(streams / STREAMS_PER_PROC), cpus // 4, MAX_PROCS))


@dataclass
class ShardedWindow(Window):
    procs: int = 1
    records: list[int] = field(default_factory=list)  # records written, per shard
    failures: list[str] = field(default_factory=list)  # one line per shard that did not finish
    clocks: list[dict[str, Any]] = field(
        default_factory=list
    )  # per shard on another node: cluster.clock
    clock_steps: int = (
        0  # times a shard found the wall clock set (StreamingClient.clock_steps), all shards
    )


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exited with status {code}"


class _Shard:
    """The parent's side of one shard."""

    def __init__(
        self, k: int, process: multiprocessing.process.BaseProcess, data_fd: int, control_fd: int
    ):
        self.k = k
        self.process = process
        self.data_fd = data_fd
        self.control_fd = control_fd
        self.reader: asyncio.StreamReader | None = None
        self.transport: asyncio.BaseTransport | None = None  # owns data_fd once made
        self.window: dict[str, Any] | None = None
        self.error: str | None = None
        self.records = 0
        self.batch = -1  # the last batch it finished
        self.alive = True

    def send(self, line: str) -> None:
        if not self.alive:
            return
        try:
            os.write(self.control_fd, line.encode() + b"\n")
        except OSError:  # it died; its reader sees the end of its pipe
            self.alive = False


async def run_sharded(
    procs: int,
    client: StreamingClient,
    work: ShardWork,
    on_line: Callable[[bytes, bool], None],
    max_connections: int,
) -> ShardedWindow:
    """Run `work` in `procs` forked shards; every record line goes to on_line(json, ok) as
    it arrives. Returns the joined window (the common start, the last shard's end)."""
    if sys.platform != "linux":
        raise CputaxError("--client-procs above 1 needs Linux (the load shards are forked)")
    ctx = multiprocessing.get_context("fork")
    shards: list[_Shard] = []
    # frozen before the forks (client.heap): the shards inherit it frozen, so neither their
    # collections nor their scenario's (nested, a no-op) write to, and copy, the parent's pages
    with steady_heap():
        try:
            for k in range(procs):
                data_r, data_w = os.pipe()
                control_r, control_w = os.pipe()
                share = Share(k, procs)
                # the parent's ends of every pipe so far: the child closes its copies
                theirs = [data_r, control_w] + [
                    fd for s in shards for fd in (s.data_fd, s.control_fd)
                ]
                process = ctx.Process(
                    target=_child,
                    name=f"cputax-shard-{k}",
                    daemon=True,
                    args=(client.like(max_connections), share, work, data_w, control_r, theirs),
                )
                process.start()
                os.close(data_w)
                os.close(control_r)
                shards.append(_Shard(k, process, data_r, control_w))
            return await _lead(shards, on_line)
        except asyncio.CancelledError:  # the run was interrupted: so is every shard
            await _interrupt(shards, on_line)
            raise
        finally:
            for shard in shards:
                shard.process.join(timeout=5)
                if shard.process.is_alive():
                    shard.process.kill()
                    shard.process.join()
                # the transport closes its pipe and leaves the loop: a closed fd still registered
                # there would be reused by the next scenario's pipes
                if shard.transport is not None:
                    shard.transport.close()
                for fd in (
                    (shard.control_fd,)
                    if shard.transport is not None
                    else (shard.data_fd, shard.control_fd)
                ):
                    with contextlib.suppress(OSError):
                        os.close(fd)


async def _lead(shards: list[_Shard], on_line: Callable[[bytes, bool], None]) -> ShardedWindow:
    loop = asyncio.get_running_loop()
    for shard in shards:
        shard.reader = asyncio.StreamReader(limit=1 << 26)  # a record echoing a 100k-token error
        shard.transport, _ = await loop.connect_read_pipe(
            lambda r=shard.reader: asyncio.StreamReaderProtocol(r),
            os.fdopen(shard.data_fd, "rb", buffering=0),
        )
    ready = await asyncio.gather(*(_until_ready(s) for s in shards))
    start_ns = None
    if all(ready):
        start_ns = time.monotonic_ns() + int(START_DELAY_S * 1e9)
        for shard in shards:
            shard.send(f"G {start_ns}")
    else:
        for shard in shards:
            shard.send("X a shard did not start")

    def batch_done() -> None:
        live = [s for s in shards if s.alive and s.window is None]
        if not live:
            return
        done = min(s.batch for s in live)
        for s in live:
            s.send(f"G {done}")

    await asyncio.gather(*(_follow(s, on_line, batch_done) for s in shards))
    failures = []
    for shard in shards:
        if shard.window is None:
            await loop.run_in_executor(None, shard.process.join, 10)
            why = shard.error or _describe_exit(shard.process.exitcode)
            failures.append(
                f"load shard {shard.k} of {len(shards)} stopped ({why}) after {shard.records} "
                "finished requests; those are kept"
            )
    windows = [s.window for s in shards if s.window is not None]
    end = max((w["end_ns"] for w in windows), default=start_ns or 0)
    return ShardedWindow(
        start_ns=start_ns or end,
        end_ns=end,
        sent=sum(w["sent"] for w in windows),
        procs=len(shards),
        records=[s.records for s in shards],
        failures=failures,
        clock_steps=sum(w.get("clock_steps", 0) for w in windows),
    )


async def _interrupt(shards: list[_Shard], on_line: Callable[[bytes, bool], None]) -> None:
    """Stop every shard as the run is stopped (SIGTERM: its requests in flight become
    `cancelled` records) and read what it still sends, for at most STOP_S."""
    live = [s for s in shards if s.window is None and s.reader is not None and s.process.is_alive()]
    for shard in live:
        with contextlib.suppress(OSError):
            os.kill(shard.process.pid, signal.SIGTERM)
        shard.alive = True
    with contextlib.suppress(asyncio.TimeoutError):
        reading = asyncio.gather(*(_follow(s, on_line, lambda: None) for s in live))
        await asyncio.wait_for(reading, STOP_S)


async def _until_ready(shard: _Shard) -> bool:
    assert shard.reader is not None
    line = await shard.reader.readline()
    if line.startswith(b"X "):
        shard.error = line[2:].decode(errors="replace").strip()
    if line != b"READY\n":
        shard.alive = False
        shard.error = shard.error or "died before it was ready"
        return False
    return True


async def _follow(
    shard: _Shard, on_line: Callable[[bytes, bool], None], batch_done: Callable[[], None]
) -> None:
    reader = shard.reader
    assert reader is not None
    while shard.alive:
        line = await reader.readline()
        if not line:
            break  # the pipe's end: the shard is gone
        kind = line[:1]
        if kind == b"R":
            shard.records += 1
            on_line(line[2:-1], line[1:2] == b"+")
        elif kind == b"B":
            shard.batch = int(line[2:])
            batch_done()
        elif kind == b"E":
            shard.window = orjson.loads(line[2:])
            break
        elif kind == b"X":
            shard.error = line[2:].decode(errors="replace").strip()
    shard.alive = False
    batch_done()  # a shard gone or done no longer holds the others at a barrier


# --- the shard's side -----------------------------------------------------------------------
def _child(
    client: StreamingClient,
    share: Share,
    work: ShardWork,
    data_fd: int,
    control_fd: int,
    parents: list[int],
) -> None:
    for fd in parents:
        os.close(fd)
    from cputax.util import die_with_parent

    die_with_parent(signal.SIGKILL)
    # Forked from inside the parent's running loop: this process has no loop of its own
    # yet, and a signal here must not wake the parent's.
    asyncio.events._set_running_loop(None)
    signal.set_wakeup_fd(-1)
    code = 0
    try:
        asyncio.run(_quiet_at_exit(_shard_main(client, share, work, data_fd, control_fd)))
    except BaseException as exc:  # reported to the parent, which names the shard
        with contextlib.suppress(OSError):
            os.write(data_fd, f"X {type(exc).__name__}: {exc}".replace("\n", " ").encode() + b"\n")
        code = 1
    os._exit(code)  # no atexit handlers or buffers inherited from the parent


async def _quiet_at_exit(main: Awaitable[None]) -> None:
    """Run the shard, then ignore further signals before its loop closes. Ctrl-C reaches a
    shard twice (the terminal's SIGINT to the group, then the parent's SIGTERM): a second one
    while the loop closes its wakeup pipe printed "Exception ignored ... Bad file
    descriptor" with a traceback. The shard has nothing left to stop by then."""
    try:
        await main
    finally:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # the last one also detaches the wakeup fd
            signal.signal(sig, signal.SIG_IGN)


async def _shard_main(
    client: StreamingClient, share: Share, work: ShardWork, data_fd: int, control_fd: int
) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_write_pipe(
        asyncio.Protocol, os.fdopen(data_fd, "wb", buffering=0)
    )
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(control), os.fdopen(control_fd, "rb", buffering=0)
    )

    async def command() -> str:
        line = await control.readline()
        if not line or line.startswith(b"X"):
            raise CputaxError(line[2:].decode().strip() if line else "the parent went away")
        return line[2:].decode().strip()

    def on_record(record: RequestRecord) -> None:
        transport.write(b"R+" if record.ok else b"R-")
        transport.write(record.to_json() + b"\n")

    async def barrier(batch: int) -> None:
        transport.write(f"B {batch}\n".encode())
        while int(await command()) < batch:
            pass

    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C (the whole group), or the parent's SIGTERM
        loop.add_signal_handler(sig, lambda: main.cancelling() or main.cancel())
    try:
        async with client:
            transport.write(b"READY\n")
            start_ns = int(await command())
            window = await work(client, share, start_ns, on_record, barrier)
    except asyncio.CancelledError:
        transport.write(b"X interrupted\n")  # after the cancelled records, which are sent
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.001)
        raise
    transport.write(
        b"E "
        + orjson.dumps(
            {
                "start_ns": window.start_ns,
                "end_ns": window.end_ns,
                "sent": window.sent,
                "clock_steps": client.clock_steps,
            }
        )
        + b"\n"
    )
    # let the pipe drain before the process ends
    while transport.get_write_buffer_size():
        await asyncio.sleep(0.001)
    transport.close()
