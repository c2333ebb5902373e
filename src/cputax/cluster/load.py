"""Load shards as Ray actors: client.shards' design, with the processes on a cluster's nodes.

Each shard is an async actor (`LoadShard`) pinned to a client node, with its own event
loop, connections and share of the arrival process (loadgen.Share: the same cut as the
forked shards). It appends every finished record to a spool file on its node, then
yields it to the driver (a Ray streaming generator), which converts the record's times
from the node's clock to its own (cluster.clock) and writes it to the run's one
requests.jsonl. Closed-loop batches wait for each other at a `BatchBarrier` actor; a
shard that fails is dropped from it, so the others go on. All shards start at one
driver moment, converted to each node's clock.

The API key never travels as an argument: a shard reads it from the environment
variable the run names, which Ray's runtime env carries (cluster.ray_env).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from cputax.client.loadgen import Share, Window
from cputax.client.shards import ShardedWindow, ShardWork
from cputax.client.stream import StreamingClient
from cputax.cluster.clock import NodeClock, Offset, measure, shift_record
from cputax.cluster.ray_env import Cluster, Node
from cputax.records import RequestRecord

__all__ = ["BatchBarrier", "ClientSpec", "LoadShard", "node_clock", "run_ray_shards"]

START_DELAY_S = 1.0  # from the driver's go to the common start: every shard is waiting by then
YIELD_EVERY_S = 0.05  # records reach the driver at least this often while they finish
STOP_S = 10.0  # an interrupted run's wait for its shards' cancelled records


class ClientSpec:
    """How a shard makes its StreamingClient: the endpoint's settings, and the name of the
    environment variable holding the API key (never the key)."""

    def __init__(
        self,
        endpoint: str,
        api: str,
        timeout_s: float,
        max_connections: int,
        api_key_env: str | None,
        keep_chunks: bool = False,
    ) -> None:
        self.endpoint, self.api, self.timeout_s = endpoint, api, timeout_s
        self.max_connections, self.api_key_env, self.keep_chunks = (
            max_connections,
            api_key_env,
            keep_chunks,
        )

    def client(self) -> StreamingClient:
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        return StreamingClient(
            self.endpoint,
            api=self.api,
            api_key=key,
            timeout_s=self.timeout_s,
            max_connections=self.max_connections,
            keep_chunks=self.keep_chunks,
        )


class BatchBarrier:
    """Closed-loop batches across shards (an async Ray actor): arrive(k, b) returns once every
    shard still alive arrived at batch b."""

    def __init__(self, shards: int) -> None:
        self.live = set(range(shards))
        self.arrived: dict[int, set[int]] = {}
        self.events: dict[int, asyncio.Event] = {}

    def _check(self) -> None:
        for batch, who in self.arrived.items():
            if self.live <= who:
                self.events.setdefault(batch, asyncio.Event()).set()

    async def arrive(self, k: int, batch: int) -> None:
        self.arrived.setdefault(batch, set()).add(k)
        event = self.events.setdefault(batch, asyncio.Event())
        self._check()
        await event.wait()

    async def drop(self, k: int) -> None:
        self.live.discard(k)
        self._check()


class LoadShard:
    """One load shard on its node (an async Ray actor)."""

    def __init__(self, spec: ClientSpec, clock_skew_ns: int = 0) -> None:
        self.spec = spec
        self._task: asyncio.Task | None = None  # the running load
        self._lines: list[tuple[bytes, bool]] = []  # every record of this run, in order
        self.skew = (
            clock_skew_ns  # tests only: a node whose clock reads this far off (its records too)
        )
        self._ahead = NodeClock("", Offset(-clock_skew_ns, 0, 0, 0))

    async def now(self) -> int:
        return time.monotonic_ns() + self.skew

    async def prepare(self, work: ShardWork) -> None:
        """Take the scenario's work (its prompts, tokenizer and all) before the start is set:
        unpickling it takes a while."""
        self.work = work

    async def run(self, share: Share, start_ns: int, barrier: Any, spool_dir: str | None = None):
        """Run this share from `start_ns` (this node's clock); yields ("records", [(line,
        ok), ...]) as requests finish and ("window", {...}) at the end."""
        queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        spool = (
            Path(spool_dir or tempfile.gettempdir()) / f"cputax-shard-{share.k}-{os.getpid()}.jsonl"
        )
        with spool.open("ab") as fh:

            def on_record(record: RequestRecord) -> None:
                line = (
                    record.to_json()
                    if not self.skew
                    else orjson.dumps(shift_record(orjson.loads(record.to_json()), self._ahead))
                )
                fh.write(line + b"\n")
                fh.flush()  # on this node's disk before the driver has it
                queue.put_nowait((line, record.ok))
                self._lines.append((line, record.ok))

            async def wait(batch: int) -> None:
                await barrier.arrive.remote(share.k, batch)

            async def go() -> tuple[Window, int]:
                async with self.spec.client() as client:
                    window = await self.work(client, share, start_ns - self.skew, on_record, wait)
                return window, client.clock_steps

            task = self._task = asyncio.create_task(go())
            while True:
                batch: list[tuple[bytes, bool]] = []
                with contextlib.suppress(asyncio.TimeoutError):
                    batch.append(await asyncio.wait_for(queue.get(), YIELD_EVERY_S))
                while not queue.empty():
                    batch.append(queue.get_nowait())
                if batch:
                    yield ("records", batch)
                if task.done() and queue.empty():
                    break
            if task.cancelled():  # interrupt(): the driver takes what it misses from there
                return
            window, steps = task.result()  # raises what the load raised: the driver names the shard
        yield (
            "window",
            {
                "start_ns": window.start_ns + self.skew,
                "end_ns": window.end_ns + self.skew,
                "sent": window.sent,
                "spool": str(spool),
                "clock_steps": steps,
            },
        )

    async def interrupt(self) -> list[tuple[bytes, bool]]:
        """The run was interrupted: cancel the load (requests in flight become `cancelled`
        records) and return every record of this run; the driver keeps those it lacks."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        return self._lines


async def _interrupt(
    placed: list[tuple[Node, Any]],
    clocks: list[NodeClock | None],
    records: list[int],
    on_line: Callable[[bytes, bool], None],
) -> None:
    """Cancel every shard's load; pass on the records the driver had not received yet."""

    async def one(k: int) -> None:
        clock = clocks[k]
        if clock is None:
            return
        lines = await placed[k][1].interrupt.remote()
        for line, ok in lines[records[k] :]:
            records[k] += 1
            on_line(orjson.dumps(shift_record(orjson.loads(line), clock)), ok)

    await asyncio.gather(*(one(k) for k in range(len(placed))), return_exceptions=True)


async def run_ray_shards(
    cluster: Cluster,
    procs: int,
    spec: ClientSpec,
    work: ShardWork,
    on_line: Callable[[bytes, bool], None],
    skews: dict[int, int] | None = None,
) -> ShardedWindow:
    """`procs` LoadShard actors spread over the client nodes, round robin; every record goes
    to on_line(json, ok) on the driver's clock. `skews` (tests) offsets a shard's clock."""
    ray = cluster.ray
    nodes = cluster.client_nodes()
    shard_actor = ray.remote(num_cpus=0, max_restarts=0)(LoadShard)
    barrier_actor = ray.remote(num_cpus=0)(BatchBarrier)
    barrier = barrier_actor.remote(procs)
    placed: list[tuple[Node, Any]] = []
    for k in range(procs):
        node = nodes[k % len(nodes)]
        placed.append(
            (node, shard_actor.options(**cluster.on(node)).remote(spec, (skews or {}).get(k, 0)))
        )
    records = [0] * procs
    windows: list[dict[str, Any] | None] = [None] * procs
    failures: list[str] = []
    work_ref = ray.put(work)
    ready = await asyncio.gather(
        *(actor.prepare.remote(work_ref) for _, actor in placed), return_exceptions=True
    )
    clocks: list[NodeClock | None] = []
    for k, ((node, actor), outcome) in enumerate(zip(placed, ready, strict=True)):
        if isinstance(outcome, BaseException):
            failures.append(
                f"load shard {k} of {procs} on node {node.ip} did not start ({_why(outcome)})"
            )
            await barrier.drop.remote(k)
            clocks.append(None)
        else:
            clocks.append(await node_clock(cluster, node, actor, bool((skews or {}).get(k))))
    start = time.monotonic_ns() + int(START_DELAY_S * 1e9)

    async def follow(k: int) -> None:
        node, actor = placed[k]
        clock = clocks[k]
        if clock is None:
            return
        try:
            stream = actor.run.options(num_returns="streaming").remote(
                Share(k, procs), clock.to_node(start), barrier
            )
            async for ref in stream:
                kind, value = await ref
                if kind == "records":
                    for line, ok in value:
                        records[k] += 1
                        on_line(orjson.dumps(shift_record(orjson.loads(line), clock)), ok)
                else:
                    windows[k] = {
                        **value,
                        "start_ns": clock.to_driver(value["start_ns"]),
                        "end_ns": clock.to_driver(value["end_ns"]),
                    }
        except Exception as exc:  # the actor or its node died, or the load raised
            failures.append(
                f"load shard {k} of {procs} on node {node.ip} stopped ({_why(exc)}) after "
                f"{records[k]} finished requests; those are kept"
            )
            with contextlib.suppress(Exception):
                await barrier.drop.remote(k)

    try:
        await asyncio.gather(*(follow(k) for k in range(procs)))
    except asyncio.CancelledError:  # the run was interrupted: so is every shard
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_interrupt(placed, clocks, records, on_line), STOP_S)
        raise
    finally:
        for _, actor in placed:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        with contextlib.suppress(Exception):
            ray.kill(barrier)
    done = [w for w in windows if w is not None]
    end = max((w["end_ns"] for w in done), default=start)
    return ShardedWindow(
        start_ns=start,
        end_ns=end,
        sent=sum(w["sent"] for w in done),
        procs=procs,
        records=records,
        failures=sorted(failures),
        clocks=[c.as_dict() for c in clocks if c],
        clock_steps=sum(w.get("clock_steps", 0) for w in done),
    )


async def node_clock(cluster: Cluster, node: Node, actor: Any, skewed: bool = False) -> NodeClock:
    """The node's clock against the driver's: none to estimate on the driver's own machine
    (unless a test skewed the actor's), else measured through the actor (in a thread: each
    probe is a blocking round trip)."""
    if cluster.same_host(node) and not skewed:
        return NodeClock.of_driver(node.name, time.monotonic_ns())
    ray = cluster.ray
    offset = await asyncio.to_thread(
        measure, lambda: ray.get(actor.now.remote()), time.monotonic_ns
    )
    return NodeClock(node.name, offset)


def _why(exc: BaseException) -> str:
    """One line for a failed shard: Ray wraps the load's own error; keep its last line."""
    text = str(exc).strip().splitlines()
    last = next((line.strip() for line in reversed(text) if line.strip()), type(exc).__name__)
    name = type(exc).__name__
    message = str(exc)
    if "ActorDied" in name or "actor is dead" in message.lower():
        detail = (
            message.split("Worker exit detail:", 1)[1].split(".", 1)[0].strip()
            if "Worker exit detail:" in message
            else ""
        )
        return "its actor died" + (f": {detail}" if detail else "")
    return last[:300]
