"""Nothing of the client in the phases (issue 17): every prompt and the open-loop schedule
are made before the clock starts, connections are open, and an open-loop request records
its intended start. Against the stub over real HTTP."""

from __future__ import annotations

import asyncio

from helpers import prepared_prompts

from cputax.client.loadgen import WHOLE, Share, arrivals, planned_indices, prebuild, run_scenario
from cputax.client.stream import StreamingClient
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig
from cputax.workload.profiles import Scenario
from cputax.workload.prompts import ScenarioPrompts

STUB = StubConfig(first_token_delay_ms=10.0, inter_token_delay_ms=1.0, output_tokens=4)


def _prompts(tok, **kw) -> ScenarioPrompts:
    return prepared_prompts(tok, STUB, 400, **kw)


def _run(url: str, prompts: ScenarioPrompts, seed: int = 3) -> tuple[list[RequestRecord], int, int]:
    """The records, the connections open when the first request was sent, the window's start."""
    records: list[RequestRecord] = []

    async def go():
        async with StreamingClient(url) as client:
            send = client.send
            at_first: list[int] = []

            async def first_send(record, build):
                at_first.append(client.connections_opened)
                return await send(record, build)

            client.send = first_send
            window = await run_scenario(client, prompts, records.append, seed=seed)
            return at_first[0], window.start_ns

    opened, start = asyncio.run(go())
    return records, opened, start


def test_no_prompt_text_is_made_once_the_clock_runs(stub, tok, monkeypatch):
    prompts = _prompts(tok, concurrency=4, batches=2)
    made = prebuild(prompts, seed=3)
    assert made == 8
    expected = {i: prompts.messages(i) for i in range(8)}

    def refuse(index: int):
        raise AssertionError(f"request {index}'s text made while requests were in flight")

    monkeypatch.setattr(prompts, "_parts", refuse)
    records, opened, _ = _run(stub.url, prompts)
    assert sorted(r.index for r in records) == list(range(8)) and all(r.ok for r in records), (
        records
    )
    assert prompts.built_late == 0
    assert opened == 4  # every stream's connection open before the first request
    assert prompts.messages(5) == expected[5]  # the store gives the same prompt as before


def test_the_store_holds_parts_not_prompts(tok):
    prompts = _prompts(tok, concurrency=2, batches=1)
    prompts.prebuild([0, 1])
    prefix, head, remaining = prompts._store[0]
    assert head.startswith("Task ") and remaining > 50 and len(head) < 400
    assert prompts.messages(0) != prompts.messages(1)  # every request distinct


def test_poisson_requests_record_their_intended_start(stub, tok):
    prompts = _prompts(tok, concurrency=4, duration_s=1.0, arrival="poisson", rate=12)
    planned = arrivals(prompts.scenario, seed=5)
    assert 3 <= len(planned) <= 40 and planned[0].offset_ns == 0
    records, _, start = _run(stub.url, prompts, seed=5)
    assert len(records) == len(planned)
    by_index = {r.index: r for r in records}
    for arrival in planned:
        r = by_index[arrival.index]
        assert r.t_intended == start + arrival.offset_ns
        assert r.t_start >= r.t_intended  # never early; how late is the schedule lag


def test_closed_loop_requests_have_no_intended_start(stub, tok):
    records, _, _ = _run(stub.url, _prompts(tok, concurrency=2, batches=1))
    assert [r.t_intended for r in records] == [None, None]


def test_planned_indices_cover_every_shard_once():
    sc = Scenario(name="s", concurrency=5, context_tokens=100, batches=3)
    whole = planned_indices(sc, 0, WHOLE)
    parts = [planned_indices(sc, 0, Share(k, 2)) for k in range(2)]
    assert sorted(whole) == sorted(parts[0] + parts[1]) == list(range(15))
    bursts = Scenario(
        name="b",
        concurrency=4,
        context_tokens=100,
        duration_s=1.0,
        arrival="burst",
        burst_size=4,
        burst_every_s=0.25,
    )
    assert [a.offset_ns for a in arrivals(bursts, 0)][::4] == [
        0,
        250_000_000,
        500_000_000,
        750_000_000,
    ]
