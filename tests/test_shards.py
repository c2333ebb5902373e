"""Load shards (client.shards): N forked processes that together are the scenario's arrival
process, against the stub over real HTTP. What each test checks follows from loadgen.Share."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal

import orjson
from helpers import prepared_prompts

from cputax.client.loadgen import Share, run_scenario
from cputax.client.shards import auto_procs, run_sharded
from cputax.client.stream import StreamingClient
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig
from cputax.workload.prompts import ScenarioPrompts

MS = 1_000_000
STUB = StubConfig(first_token_delay_ms=20.0, inter_token_delay_ms=2.0, output_tokens=8)


def _prompts(tok, **kw) -> ScenarioPrompts:
    return prepared_prompts(tok, STUB, 300, **kw)


def _sharded(url: str, prompts: ScenarioPrompts, procs: int, work=None):
    lines: list[tuple[bytes, bool]] = []

    def default(client, share, start_ns, on_record, barrier):
        return run_scenario(
            client, prompts, on_record, seed=7, share=share, start_ns=start_ns, barrier=barrier
        )

    async def go():
        async with StreamingClient(url) as client:
            return await run_sharded(
                procs, client, work or default, lambda line, ok: lines.append((line, ok)), 64
            )

    window = asyncio.run(go())
    return window, [RequestRecord.from_dict(orjson.loads(line)) for line, _ in lines]


def _shard_of(index: int, concurrency: int, procs: int) -> int:
    return (index % concurrency) % procs


def test_batches_are_split_and_wait_for_every_shard(stub, tok):
    prompts = _prompts(tok, concurrency=6, batches=3)
    window, records = _sharded(stub.url, prompts, 3)
    assert window.failures == [] and window.procs == 3 and sum(window.records) == 18 == window.sent
    assert sorted(r.index for r in records) == list(range(18)) and all(r.ok for r in records)
    assert {_shard_of(r.index, 6, 3) for r in records} == {0, 1, 2}
    for b in range(3):
        batch = [r for r in records if r.batch == b]
        assert sorted(r.index for r in batch) == list(range(6 * b, 6 * b + 6))
        if b:  # no request of batch b started before every request of batch b-1 ended
            before = [r for r in records if r.batch == b - 1]
            assert min(r.t_start for r in batch) >= max(r.t_end for r in before)
    assert min(r.t_start for r in records) >= window.start_ns


def test_a_closed_loop_keeps_its_concurrency_over_the_shards(stub, tok):
    prompts = _prompts(tok, concurrency=5, duration_s=1.0)
    window, records = _sharded(stub.url, prompts, 2)
    assert window.failures == [] and len(records) == window.sent > 10
    assert len({r.index for r in records}) == len(records)
    events = sorted(
        [(r.t_start, 1) for r in records] + [(r.t_end, -1) for r in records],
        key=lambda e: (e[0], e[1]),
    )
    level = peak = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    assert peak == 5  # 3 + 2 workers, never more
    assert {r.index % 2 for r in records} == {0, 1}  # Share.index: shard k sends k, k + 2, ...


def test_bursts_fire_together_in_every_shard(stub, tok):
    prompts = _prompts(
        tok, concurrency=5, duration_s=0.85, arrival="burst", burst_size=5, burst_every_s=0.3
    )
    window, records = _sharded(stub.url, prompts, 2)
    assert sorted({r.batch for r in records}) == [0, 1, 2]
    bursts = [[r for r in records if r.batch == b] for b in range(3)]
    for b, burst in enumerate(bursts):
        assert len(burst) == 5  # 3 from one shard, 2 from the other
        assert {r.index % 2 for r in burst} == {0, 1}  # Share.index: shard k sends k, k + 2, ...
        # Together: every shard meant the burst for the same instant on the shared clock, a
        # period after the last, and sent none early. How late each went is this machine's
        # schedule lag (a shard that counted from its own start would differ by its fork time).
        assert {r.t_intended for r in burst} == {window.start_ns + b * 300 * MS}
        assert all(r.t_start >= r.t_intended for r in burst)
    for before, after in itertools.pairwise(bursts):  # and in order: one burst, then the next
        assert max(r.t_start for r in before) < min(r.t_start for r in after)


def test_poisson_rate_is_split_over_shards(stub, tok):
    prompts = _prompts(tok, concurrency=8, duration_s=2.0, arrival="poisson", rate=30.0)
    _, records = _sharded(stub.url, prompts, 3)
    # the sum of three Poisson processes at 10/s over 2 s: 60 expected, sd ~8
    assert 30 < len(records) < 95 and len({r.index for r in records}) == len(records)
    assert {r.index % 3 for r in records} == {0, 1, 2}


def test_a_killed_shard_keeps_its_finished_requests_and_is_named(stub, tok):
    prompts = _prompts(tok, concurrency=4, batches=3)

    async def work(client, share, start_ns, on_record, barrier):
        if share.k == 1:  # one request, then the process dies as if the OOM killer took it
            on_record(
                await client.send(
                    prompts.record(1, 0), lambda: prompts.payload(prompts.messages(1))
                )
            )
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return await run_scenario(
            client, prompts, on_record, share=share, start_ns=start_ns, barrier=barrier
        )

    window, records = _sharded(stub.url, prompts, 2, work)
    assert window.records == [6, 1] and len(records) == 7
    assert window.failures == [
        "load shard 1 of 2 stopped (killed by SIGKILL) after 1 finished requests; those are kept"
    ]


def test_a_shard_that_raises_says_why(stub, tok):
    prompts = _prompts(tok, concurrency=2, batches=1)

    async def work(client, share, start_ns, on_record, barrier):
        if share.k == 0:
            raise RuntimeError("no more file descriptors")
        return await run_scenario(
            client, prompts, on_record, share=share, start_ns=start_ns, barrier=barrier
        )

    window, records = _sharded(stub.url, prompts, 2, work)
    assert len(records) == 1 and window.records == [0, 1]
    assert window.failures == [
        "load shard 0 of 2 stopped (RuntimeError: no more file descriptors) after 0 "
        "finished requests; those are kept"
    ]


def test_share_parts_add_up_and_auto_procs():
    assert [Share(k, 3).part(7) for k in range(3)] == [3, 2, 2]
    assert sorted(Share(k, 3).index(i) for k in range(3) for i in range(4)) == list(range(12))
    assert auto_procs(32, cpus=64) == 1 and auto_procs(256, cpus=2) == 1
    assert auto_procs(512, cpus=64) == 4 and auto_procs(100_000, cpus=256) == 16
