"""The load generator: closed-loop batches, closed loop for a duration, Poisson, bursts.

Messages for request i are made before its clock starts; only the payload build
and JSON encode are timed (the study's "serialize"). Records go to `on_record`
as each request finishes, so the caller can write them at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cputax.records import RequestRecord
from cputax.workload.prompts import ScenarioPrompts


class Client(Protocol):
    async def send(self, record: RequestRecord, build: Callable[[], dict]) -> RequestRecord: ...


@dataclass
class Window:
    """When a scenario's measured part ran, on the monotonic clock (ns)."""

    start_ns: int
    end_ns: int
    sent: int


async def _one(client: Client, prompts: ScenarioPrompts, index: int, batch: int | None) -> RequestRecord:
    messages = prompts.messages(index)
    record = prompts.record(index, batch)
    return await client.send(record, lambda: prompts.payload(messages))


async def warm_up(client: Client, prompts: ScenarioPrompts, count: int) -> list[RequestRecord]:
    """Unrecorded requests first (model load, caches of the shared prefix), one at a time."""
    return [await _one(client, prompts, -1 - i, None) for i in range(count)]


async def run_scenario(
    client: Client,
    prompts: ScenarioPrompts,
    on_record: Callable[[RequestRecord], None],
    seed: int = 0,
) -> Window:
    sc = prompts.scenario
    start = time.monotonic_ns()
    counter = iter(range(1 << 62))

    async def fire(batch: int | None) -> None:
        on_record(await _one(client, prompts, next(counter), batch))

    if sc.batches is not None:
        for batch in range(sc.batches):
            await asyncio.gather(*(fire(batch) for _ in range(sc.concurrency)))
    else:
        deadline = start + int(sc.duration_s * 1e9)
        if sc.arrival == "closed":

            async def worker() -> None:
                while time.monotonic_ns() < deadline:
                    await fire(None)

            await asyncio.gather(*(worker() for _ in range(sc.concurrency)))
        else:
            tasks: list[asyncio.Task] = []
            rng = random.Random(seed)
            burst = 0
            next_at = start
            while next_at < deadline:
                await asyncio.sleep(max(0.0, (next_at - time.monotonic_ns()) / 1e9))
                if sc.arrival == "poisson":
                    tasks.append(asyncio.create_task(fire(None)))
                    next_at += int(rng.expovariate(sc.rate) * 1e9)
                else:
                    tasks += [asyncio.create_task(fire(burst)) for _ in range(sc.burst_size)]
                    burst += 1
                    next_at += int(sc.burst_every_s * 1e9)
            await asyncio.gather(*tasks)
    return Window(start, time.monotonic_ns(), next(counter))
