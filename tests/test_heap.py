"""The measured part of a scenario runs with the heap it started with frozen out of the
collector's walks (client.heap): a full collection in the middle of streaming stalls the
loop, the kernel merges the tokens it meanwhile queued, and their stamps go wrong."""

from __future__ import annotations

import asyncio
import gc

from cputax.client.heap import steady_heap
from cputax.client.loadgen import run_scenario
from cputax.records import RequestRecord
from cputax.text.tokenizer import load_tokenizer
from cputax.workload.profiles import Scenario
from cputax.workload.prompts import ScenarioPrompts, local_counter


def test_the_heap_is_frozen_inside_and_thawed_after_even_nested():
    assert gc.get_freeze_count() == 0
    before = len(gc.get_objects())
    with steady_heap():
        frozen = gc.get_freeze_count()
        assert frozen >= before // 2  # what existed (less what the first collection freed)
        # never more than `frozen`: the count may fall (a frozen object freed by another
        # thread of the test process), it must not grow
        with steady_heap():  # nested: still frozen, not frozen twice
            assert gc.get_freeze_count() <= frozen
        assert gc.get_freeze_count() <= frozen
        young = [[i] for i in range(1000)]  # made inside: the collector still sees these
        assert all(gc.is_tracked(x) for x in young[:3])
        assert gc.get_freeze_count() <= frozen
    assert gc.get_freeze_count() == 0


def test_a_scenario_streams_with_its_heap_frozen():
    seen: list[int] = []

    class Client:
        async def send(self, record: RequestRecord, build) -> RequestRecord:
            seen.append(gc.get_freeze_count())
            build()
            record.ok = True
            return record

    tok = load_tokenizer()
    prompts = ScenarioPrompts(
        Scenario(name="s", context_tokens=200, max_tokens=4, batches=2, concurrency=3),
        tok,
        model="m",
    )
    asyncio.run(prompts.prepare(local_counter(tok)))
    records: list[RequestRecord] = []
    asyncio.run(run_scenario(Client(), prompts, records.append))
    assert len(records) == 6 and len(seen) == 6
    assert min(seen) > 0  # every request went out with the heap frozen
    assert gc.get_freeze_count() == 0  # and it is thawed once the scenario ends
