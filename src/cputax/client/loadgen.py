"""The load generator: closed-loop batches, closed loop for a duration, Poisson, bursts.

Every request's prompt is made before the scenario's clock starts (`prebuild`: the
prepared store of workload.prompts), and so is the open-loop schedule (`arrivals`):
while requests are in flight the loop only joins prepared text, builds the JSON bytes,
writes and reads. Only the payload build and JSON encode are timed (the study's
"serialize"). An open-loop request records when it was meant to start (t_intended)
beside when it did (t_start): the client's own lateness is never hidden. Records go to `on_record`
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
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cputax.client.heap import steady_heap
from cputax.records import RequestRecord
from cputax.util import sleep_until
from cputax.workload.profiles import Scenario
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


async def _one(
    client: Client,
    prompts: ScenarioPrompts,
    index: int,
    batch: int | None,
    intended_ns: int | None = None,
    on_cancel: Callable[[RequestRecord], None] | None = None,
) -> RequestRecord:
    messages = prompts.messages(index)  # prepared before the clock (prebuild): a join of texts
    record = prompts.record(index, batch)
    record.t_intended = intended_ns
    try:
        return await client.send(record, lambda: prompts.payload(messages))
    except asyncio.CancelledError:
        # interrupted (Ctrl-C, SIGTERM): the request is still a record, with what it received
        if on_cancel is not None:
            record.ok, record.error = False, record.error or "cancelled"
            on_cancel(record)
        raise


@dataclass(frozen=True)
class Arrival:
    """One open-loop request of a share: when it is meant to start (ns after the start)."""

    offset_ns: int
    index: int
    batch: int | None


# Closed loop for a duration sends as many requests as the server answers: the store is
# made for one request per worker every CLOSED_PLAN_S, and a request past it is made late
# (counted: ScenarioPrompts.built_late, windows.jsonl's prompts_built_late).
CLOSED_PLAN_S = 0.05


def arrivals(sc: Scenario, seed: int, share: Share = WHOLE) -> list[Arrival]:
    """The share's open-loop arrivals (Poisson or bursts), drawn before the clock starts."""
    if sc.duration_s is None or sc.arrival == "closed":
        return []
    deadline = int(sc.duration_s * 1e9)
    out: list[Arrival] = []
    counter = 0
    if sc.arrival == "poisson":
        rng = random.Random(share.seed(seed))
        at = int(rng.expovariate(sc.rate / share.n) * 1e9) if share.n > 1 else 0
        while at < deadline:
            out.append(Arrival(at, share.index(counter), None))
            counter += 1
            at += int(rng.expovariate(sc.rate / share.n) * 1e9)
        return out
    burst, at = 0, 0
    while at < deadline:
        for _ in range(share.part(sc.burst_size)):
            out.append(Arrival(at, share.index(counter), burst))
            counter += 1
        burst += 1
        at += int(sc.burst_every_s * 1e9)
    return out


def planned_indices(sc: Scenario, seed: int, share: Share = WHOLE) -> list[int]:
    """The request indices the share will send (closed loop for a duration: an estimate)."""
    if sc.batches is not None:
        return [
            b * sc.concurrency + j
            for b in range(sc.batches)
            for j in range(share.k, sc.concurrency, share.n)
        ]
    if sc.arrival == "closed":
        per_worker = max(1, math.ceil((sc.duration_s or 0) / CLOSED_PLAN_S))
        return [share.index(c) for c in range(share.part(sc.concurrency) * per_worker)]
    return [a.index for a in arrivals(sc, seed, share)]


def prebuild(prompts: ScenarioPrompts, seed: int, shares: int = 1) -> int:
    """Every request of the scenario (all `shares`) prepared: called before the clock starts,
    and before load shards are forked or sent to Ray, so they inherit the store."""
    sc = prompts.scenario
    return sum(prompts.prebuild(planned_indices(sc, seed, Share(k, shares))) for k in range(shares))


async def warm_up(client: Client, prompts: ScenarioPrompts, count: int) -> list[RequestRecord]:
    """Unrecorded requests first (model load, caches of the shared prefix), one at a time."""
    return [await _one(client, prompts, -1 - i, None) for i in range(count)]


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
        return await _run(client, prompts, on_record, seed, share, start_ns, barrier)


async def _run(
    client: Client,
    prompts: ScenarioPrompts,
    on_record: Callable[[RequestRecord], None],
    seed: int,
    share: Share,
    start_ns: int | None,
    barrier: Barrier | None,
) -> Window:
    sc = prompts.scenario
    # Everything the requests need is made before the start: prompts (if the caller has not
    # already: session does it before forking shards) and the open-loop schedule.
    prompts.prebuild(planned_indices(sc, seed, share))
    schedule = arrivals(sc, seed, share)
    if (open_connections := getattr(client, "open_connections", None)) is not None:
        await open_connections(share.part(max(sc.concurrency, sc.burst_size or 0)))
    start = start_ns if start_ns is not None else time.monotonic_ns()  # default: now, ready
    await sleep_until(start)
    counter = iter(range(1 << 62))
    sent = 0

    async def fire(index: int, batch: int | None, intended: int | None = None) -> None:
        nonlocal sent
        sent += 1
        on_record(await _one(client, prompts, index, batch, intended, on_record))

    if sc.batches is not None:
        for batch in range(sc.batches):
            base = batch * sc.concurrency
            await asyncio.gather(
                *(fire(base + j, batch) for j in range(share.k, sc.concurrency, share.n))
            )
            if barrier is not None:
                await barrier(batch)
    elif sc.arrival == "closed":
        deadline = start + int(sc.duration_s * 1e9)

        async def worker() -> None:
            while time.monotonic_ns() < deadline:
                await fire(share.index(next(counter)), None)

        await asyncio.gather(*(worker() for _ in range(share.part(sc.concurrency))))
    else:
        tasks: list[asyncio.Task] = []
        for arrival in schedule:
            intended = start + arrival.offset_ns
            if intended > time.monotonic_ns():
                await sleep_until(intended)
            tasks.append(asyncio.create_task(fire(arrival.index, arrival.batch, intended)))
        await asyncio.gather(*tasks)
    return Window(start, time.monotonic_ns(), sent)
