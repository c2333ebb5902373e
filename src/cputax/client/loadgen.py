"""The load generator: closed-loop batches, closed loop for a duration, Poisson, bursts.

Messages for request i are made before its clock starts; only the payload build
and JSON encode are timed (the study's "serialize"). Records go to `on_record`
as each request finishes, so the caller can write them at once.

A `Share` is one load shard's part of a scenario (client.shards runs N of them in N
processes), cut so that the N parts together are the scenario's arrival process:
- batches: every batch's `concurrency` requests are split over the shards, and no
  shard starts batch b+1 before all of them finished batch b (`barrier`);
- closed loop for a duration: the workers are split, all run to one deadline;
- Poisson at rate r: each shard is Poisson at r/N with a seed of its own (the sum of
  independent Poisson processes is Poisson at r);
- bursts: each burst's requests are split, every shard fires at the same moments.
All shards start at one `start_ns` on the monotonic clock the processes share.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cputax.client.heap import steady_heap
from cputax.records import RequestRecord
from cputax.workload.prompts import ScenarioPrompts


class Client(Protocol):
    async def send(self, record: RequestRecord, build: Callable[[], dict]) -> RequestRecord: ...


@dataclass(frozen=True)
class Share:
    """Shard k of n: which part of a scenario's requests, workers and rate it sends."""

    k: int = 0
    n: int = 1

    def part(self, total: int) -> int:
        """This shard's part of `total` (the parts add up to it)."""
        return total // self.n + (self.k < total % self.n)

    def index(self, local: int) -> int:
        """The scenario-wide index of this shard's local-th request (unique over shards)."""
        return local * self.n + self.k

    def seed(self, seed: int) -> int:
        return seed if self.n == 1 else seed * 1_000_003 + self.k


WHOLE = Share()  # the one shard of an unsharded run
Barrier = Callable[[int], Awaitable[None]]


@dataclass
class Window:
    """When a scenario's measured part ran, on the monotonic clock (ns)."""

    start_ns: int
    end_ns: int
    sent: int


async def _one(client: Client, prompts: ScenarioPrompts, index: int, batch: int | None,
               on_cancel: Callable[[RequestRecord], None] | None = None) -> RequestRecord:
    messages = prompts.messages(index)
    record = prompts.record(index, batch)
    try:
        return await client.send(record, lambda: prompts.payload(messages))
    except asyncio.CancelledError:
        # interrupted (Ctrl-C, SIGTERM): the request is still a record, with what it received
        if on_cancel is not None:
            record.ok, record.error = False, record.error or "cancelled"
            on_cancel(record)
        raise


async def warm_up(client: Client, prompts: ScenarioPrompts, count: int) -> list[RequestRecord]:
    """Unrecorded requests first (model load, caches of the shared prefix), one at a time."""
    return [await _one(client, prompts, -1 - i, None) for i in range(count)]


async def _sleep_until(t_ns: int) -> None:
    await asyncio.sleep(max(0.0, (t_ns - time.monotonic_ns()) / 1e9))


async def run_scenario(
    client: Client,
    prompts: ScenarioPrompts,
    on_record: Callable[[RequestRecord], None],
    seed: int = 0,
    share: Share = WHOLE,
    start_ns: int | None = None,
    barrier: Barrier | None = None,
) -> Window:
    """This share of the scenario from `start_ns` (default now); `barrier(b)` returns once
    every shard finished batch b (None: this is the only shard)."""
    with steady_heap():  # collected and frozen before the start: see client.heap
        return await _run(client, prompts, on_record, seed, share,
                          start_ns if start_ns is not None else time.monotonic_ns(), barrier)


async def _run(client: Client, prompts: ScenarioPrompts, on_record: Callable[[RequestRecord], None],
               seed: int, share: Share, start: int, barrier: Barrier | None) -> Window:
    sc = prompts.scenario
    await _sleep_until(start)
    counter = iter(range(1 << 62))
    sent = 0

    async def fire(index: int, batch: int | None) -> None:
        nonlocal sent
        sent += 1
        on_record(await _one(client, prompts, index, batch, on_record))

    if sc.batches is not None:
        for batch in range(sc.batches):
            base = batch * sc.concurrency
            await asyncio.gather(*(fire(base + j, batch) for j in range(share.k, sc.concurrency, share.n)))
            if barrier is not None:
                await barrier(batch)
    else:
        deadline = start + int(sc.duration_s * 1e9)
        if sc.arrival == "closed":

            async def worker() -> None:
                while time.monotonic_ns() < deadline:
                    await fire(share.index(next(counter)), None)

            await asyncio.gather(*(worker() for _ in range(share.part(sc.concurrency))))
        else:
            tasks: list[asyncio.Task] = []
            rng = random.Random(share.seed(seed))
            burst = 0
            next_at = start
            if sc.arrival == "poisson":
                next_at += int(rng.expovariate(sc.rate / share.n) * 1e9) if share.n > 1 else 0
            while next_at < deadline:
                await _sleep_until(next_at)
                if sc.arrival == "poisson":
                    tasks.append(asyncio.create_task(fire(share.index(next(counter)), None)))
                    next_at += int(rng.expovariate(sc.rate / share.n) * 1e9)
                else:
                    tasks += [asyncio.create_task(fire(share.index(next(counter)), burst))
                              for _ in range(share.part(sc.burst_size))]
                    burst += 1
                    next_at += int(sc.burst_every_s * 1e9)
            await asyncio.gather(*tasks)
    return Window(start, time.monotonic_ns(), sent)
