"""The streaming client's own HTTP/1.1 path: kernel receive stamps against the stub's truth.

The stub runs as a child process, so a callback that blocks this test's event loop on
purpose does not stop the stub from sending; both read CLOCK_MONOTONIC, so the stub's
send times (GET /stub/truth) subtract from the client's stamps directly.

What the kernel's stamp can and cannot do, both pinned down here: a read's stamp is the
newest segment's in it, and the kernel merges segments queued on a socket nobody reads.
A loop blocked for less than the gap to the next token keeps the stamp exact; one blocked
across several tokens stamps them all with the last one's time, and says so
(RequestRecord.shared_stamps).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from cputax.client.stream import StreamingClient
from cputax.client.wire import Clock, Pool
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig, StubServer

MS = 1_000_000
TIMED = StubConfig(
    headers_delay_ms=5.0,
    first_token_delay_ms=20.0,
    inter_token_delay_ms=5.0,
    output_tokens=16,
    token_truth=True,
)
# headers at 5 ms, first token at 25 ms, then one every 150 ms: a 60 ms block started at
# 12 ms ends before the second token comes
SLOW = StubConfig(
    headers_delay_ms=5.0,
    first_token_delay_ms=20.0,
    inter_token_delay_ms=150.0,
    output_tokens=3,
    token_truth=True,
)
BLOCK_MS = 60.0


def _payload() -> dict:
    return {
        "model": TIMED.model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": TIMED.output_tokens,
    }


@pytest.fixture(scope="module")
def stub():
    with StubServer(TIMED, process=True) as server:
        yield server


@pytest.fixture(scope="module")
def slow_stub():
    with StubServer(SLOW, process=True) as server:
        yield server


async def _requests(
    url: str,
    n: int,
    block_after_ms: float | None = None,
    blocks: list[tuple[int, int]] | None = None,
):
    """`n` requests one after another; with `block_after_ms`, the loop is blocked for BLOCK_MS
    that long after each is sent, and when each block began and ended goes to `blocks`."""
    blocked = [] if blocks is None else blocks
    async with StreamingClient(url, keep_chunks=True, max_connections=4) as client:
        records = []
        for i in range(n):
            if block_after_ms is not None:
                # between the headers (5 ms) and the first token (25 ms): the loop is busy
                # for BLOCK_MS when the first token arrives, and reads it only afterwards
                loop = asyncio.get_running_loop()
                loop.call_later(block_after_ms / 1000, _busy, BLOCK_MS, blocked)
            records.append(await client.send(RequestRecord("wire", index=i), _payload))
        truth = await client.get_json("/stub/truth")
        return records, truth, client.clock, client.kernel_stamps, client.connections_opened


def _busy(ms: float, blocks: list[tuple[int, int]]) -> None:
    start = time.monotonic_ns()
    while time.monotonic_ns() < start + int(ms * MS):
        pass
    blocks.append((start, time.monotonic_ns()))


def _blocked(url: str, n: int):
    """`n` requests, the loop blocked for BLOCK_MS from 12 ms into each: each record with
    when its block began and ended; the stub's truth; the client's clock."""
    blocks: list[tuple[int, int]] = []
    records, truth, clock, _, _ = asyncio.run(_requests(url, n, 12.0, blocks))
    assert len(blocks) == len(records) == n
    return list(zip(records, blocks, strict=True)), truth, clock


def test_clock_conversion_is_tight():
    clock = Clock.measure()
    assert 0 <= clock.error_ns < 1 * MS  # the best of several reads: one preempted read is not it
    # a wall-clock read converts to a time between the monotonic reads around it
    before, wall, after = time.monotonic_ns(), time.time_ns(), time.monotonic_ns()
    assert before - clock.error_ns <= clock.monotonic(wall) <= after + clock.error_ns


STEP_NS = 463_000  # the wall clock set by this much since the offset was read (what one CI run met)


def _stamp_now(pool: Pool, ago_ns: int = 20_000) -> tuple[int, int]:
    """A read the kernel stamped `ago_ns` before the loop did, converted by `pool`."""
    realtime = time.time_ns() - ago_ns
    t_loop = time.monotonic_ns()
    return pool.to_monotonic(realtime, t_loop), t_loop


def test_a_wall_clock_set_ahead_is_caught_by_the_first_stamp_after_it():
    clock = Clock.measure()
    # read before the step: realtime now runs STEP_NS ahead of what this offset says
    pool = Pool("127.0.0.1", 1, 1, Clock(clock.offset_ns - STEP_NS, clock.error_ns))
    kernel, loop = _stamp_now(pool)
    assert pool.clock_steps == 1
    assert kernel <= loop + pool.clock.error_ns
    assert abs((loop - kernel) - 20_000) < STEP_NS / 4  # the fresh offset, not the stale one
    kernel, loop = _stamp_now(pool)
    assert pool.clock_steps == 1 and kernel <= loop + pool.clock.error_ns


def test_a_wall_clock_set_back_is_caught_at_the_next_recheck_only():
    clock = Clock.measure()
    stale = Clock(clock.offset_ns + STEP_NS, clock.error_ns)
    # the stamp is early by the step, which no single stamp can show
    kernel, loop = _stamp_now(Pool("127.0.0.1", 1, 1, stale))
    assert loop - kernel > STEP_NS
    pool = Pool("127.0.0.1", 1, 1, stale, recheck_ns=0)  # every stamp reads the offset again
    kernel, loop = _stamp_now(pool)
    assert pool.clock_steps == 1 and abs((loop - kernel) - 20_000) < STEP_NS / 4


def test_rereading_an_unchanged_offset_counts_no_step():
    pool = Pool("127.0.0.1", 1, 1, recheck_ns=0)
    for _ in range(200):
        kernel, loop = _stamp_now(pool)
        assert kernel <= loop + pool.clock.error_ns
    assert pool.clock_steps == 0


def test_kernel_stamps_lie_between_the_stubs_write_and_the_loops_read(stub):
    records, truth, clock, kernel, _ = asyncio.run(_requests(stub.url, 4))
    assert kernel and all(r.ok for r in records)
    for r in records:
        assert r.t_headers_kernel is not None and r.t_headers_kernel <= r.t_headers + clock.error_ns
        stamps = r.extra["token_ns"]
        assert len(stamps) == TIMED.output_tokens
        for loop, kern in stamps:
            assert (
                kern <= loop + clock.error_ns
            )  # the kernel had the bytes before the loop saw them
        # and never before the stub wrote them (a wrong conversion is seconds off one way
        # or the other; how long the loop took to read them is this machine's, not asserted)
        sent = truth[r.extra["response_id"]]["token_ns"]
        assert all(kern >= s - clock.error_ns for (_, kern), s in zip(stamps, sent, strict=True))


def test_a_blocked_loop_moves_the_loop_stamp_not_the_kernel_stamp(slow_stub):
    runs, truth, clock = _blocked(slow_stub.url, 3)
    during = 0
    for r, (block_start, block_end) in runs:
        sent = truth[r.extra["response_id"]]["first_token_ns"]
        assert r.t_first_token_kernel >= sent - clock.error_ns  # never before the stub wrote it
        assert r.shared_stamps == 0  # the next token comes 150 ms later
        # Written while the loop was blocked (at ~25 ms of 12-72 ms, unless this loaded
        # machine moved the block or held the stub back): the kernel stamp is when it
        # arrived, before the block ended; the loop could read it only after.
        if block_start < sent < block_end:
            during += 1
            assert r.t_first_token_kernel < block_end <= r.t_first_token
    assert during, "no first token was written while the loop was blocked"


def test_a_loop_blocked_across_tokens_shares_one_stamp_and_counts_it(stub):
    # 60 ms from 12 ms: tokens at 25, 30, ... 70 ms queue up and are merged by the kernel
    runs, truth, clock = _blocked(stub.url, 2)
    merged = 0
    for r, (block_start, block_end) in runs:
        sent = truth[r.extra["response_id"]]["token_ns"]
        stamps = [k for _, k in r.extra["token_ns"]]
        # the tokens the stub wrote while the loop was blocked (wherever this loaded
        # machine put the block) were read at once after it: one stamp, counted as shared
        during = [i for i, t in enumerate(sent) if block_start < t < block_end]
        if len(during) < 2:
            continue
        merged += 1
        assert len({stamps[i] for i in during}) == 1 and r.shared_stamps >= len(during) - 1
        # the newest one's arrival: an upper bound for the others, never before it was written
        assert stamps[during[-1]] >= sent[during[-1]] - clock.error_ns
    assert merged, "the stub wrote fewer than two tokens while the loop was blocked"


def test_connections_are_kept_alive(stub):
    records, _, _, _, opened = asyncio.run(_requests(stub.url, 6))
    assert all(r.ok for r in records) and opened == 1  # one request at a time: one connection


def test_aiohttp_path_has_loop_stamps_only(stub):
    async def one():
        async with StreamingClient(stub.url, keep_chunks=True, wire=False) as client:
            return await client.send(RequestRecord("wire"), _payload), client.kernel_stamps

    record, kernel = asyncio.run(one())
    assert record.ok and not kernel
    assert record.t_first_token_kernel is None and record.t_first_token is not None
    assert all(k is None for _, k in record.extra["token_ns"])
