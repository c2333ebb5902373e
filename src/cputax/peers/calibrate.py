"""`cputax calibrate`: the client's own floor, measured against the stub's known timings.

Two stubs run as child processes (StubServer(process=True)). In a thread of this
process the stub would take the GIL from the client, and every stall of one would
show up as timing error of the other; as a process it only shares the CPUs, which the
output says. The truth crosses over through GET /stub/truth: both processes read
CLOCK_MONOTONIC, so the client's timestamps subtract from the stub's directly.

- The timed stub (TIMED) answers like a fast server: headers after 5 ms, first token
  20 ms later, then one token every 5 ms (200 tokens/s per stream), 64 tokens, and it
  keeps every token's send time. Against it: the error of the client's first-token
  and inter-token times, on the loop's clock and on the kernel's receive stamps, and
  the client's CPU per chunk: the whole process (every thread, aiohttp and the loop
  included, the stubs excluded), and the parse alone.
- The fast stub (FAST) has no delays: total chunks / wall time at a level is the most
  the client (with the stub beside it) can take in: the ceiling. A level whose offered
  rate is near it measures the client falling behind, on purpose; the output marks it.

`peers()` runs cputax and vLLM's own benchmark client (peers.clients) against the same
stubs, each in a process of its own, the order alternating, at the same levels.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import msgspec

from cputax.client.heap import steady_heap
from cputax.client.stream import StreamingClient
from cputax.errors import CputaxError
from cputax.peers.clients import PEERS, available, run_peer
from cputax.records import RequestRecord
from cputax.results.calibration import (
    Calibration,
    Ceiling,
    Level,
    PairedRatios,
    PeerRow,
    PeerRun,
    PeersResult,
    PeerStub,
    Skipped,
    StubTimings,
)
from cputax.targets.model import default_cache_dir
from cputax.targets.stub import StubConfig, StubServer
from cputax.util import cpu_model, percentile

__all__ = [
    "CEILING_SHARE",
    "FAST",
    "KEYS",
    "PEER_KEYS",
    "TIMED",
    "ceiling_line",
    "errors_against_truth",
    "failed",
    "load_ceiling",
    "paired_ratios",
    "peers",
    "run_calibration",
    "save_ceiling",
]

TIMED = StubConfig(
    headers_delay_ms=5.0,
    first_token_delay_ms=20.0,
    inter_token_delay_ms=5.0,
    output_tokens=64,
    token_truth=True,
)
FAST = StubConfig(output_tokens=64)
# an offered rate above this share of the ceiling measures the client falling behind
CEILING_SHARE = 0.8
_MESSAGES = [
    {
        "role": "system",
        "content": "You are a coding agent. Use the tools to read, edit and test code.",
    },
    {
        "role": "user",
        "content": "Run the test suite and fix the first failing test in src/parser.py.",
    },
]
# every level's fields (results.calibration.Level), as `calibrate --json` documents them
KEYS = (
    "concurrency",
    "requests",
    "errors",
    "client_cpu_us_per_chunk",
    "parse_cpu_us_per_chunk",
    "client_build_cpu_us",
    "offered_chunks_per_s",
    "max_chunks_per_s",
    "past_ceiling",
    "ttft_error_ms_p50",
    "ttft_error_ms_p99",
    "ttft_error_kernel_ms_p50",
    "ttft_error_kernel_ms_p99",
    "itl_error_ms_p99",
    "itl_error_kernel_ms_p99",
    "headers_error_ms_p50",
    "headers_error_ms_p99",
    "client_lag_ms_p50",
    "client_lag_ms_p99",
    "shared_stamps_pct",
)
PEER_KEYS = (
    "client",
    "streams",
    "cpu_us_per_chunk",
    "ttft_error_ms_p50",
    "ttft_error_ms_p99",
    "max_chunks_per_s",
)
# a peer's figures taken as the median over its repeats (peers_row)
_MEDIANS = (
    "cpu_us_per_chunk",
    "ttft_error_ms_p50",
    "ttft_error_ms_p99",
    "itl_error_ms_p99",
    "ttft_error_loop_ms_p99",
    "itl_error_loop_ms_p99",
    "max_chunks_per_s",
)
_RATIOS = ("cpu_us_per_chunk", "ttft_error_ms_p99", "itl_error_ms_p99", "max_chunks_per_s")


def _payload() -> dict[str, Any]:
    return {"model": TIMED.model, "messages": _MESSAGES, "max_tokens": TIMED.output_tokens}


def _percentile(values: list[float], q: float) -> float | None:
    """None for no data, else the shared percentile (q in 0..1 here)."""
    return percentile(values, 100 * q) if values else None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _chunks_sent(requests: int, tokens: int) -> int:
    """What the stub writes per request: the role chunk, a chunk per token, the usage chunk."""
    return requests * (tokens + 2)


async def _closed_loop(
    client: StreamingClient, concurrency: int, n: int
) -> tuple[list[RequestRecord], int, float]:
    """n requests from `concurrency` workers; the records, the wall time, the process's CPU
    seconds."""
    records: list[RequestRecord] = []
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:
            records.append(await client.send(RequestRecord("calibrate", index=i), _payload))

    with steady_heap():  # as a run's scenarios (client.heap)
        # this process's user + system, not the stubs'
        start, cpu = time.monotonic_ns(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
    return records, time.monotonic_ns() - start, cpu


def errors_against_truth(
    seen: list[dict[str, Any]], truth: dict[str, dict[str, Any]]
) -> dict[str, list[float]]:
    """Per request seen (key, first, first_kernel, tokens, tokens_kernel), the error of its
    first-token time and of each gap between tokens against the stub's send times, ms."""
    out: dict[str, list[float]] = {"ttft": [], "ttft_kernel": [], "itl": [], "itl_kernel": []}
    stamps = (("", "first", "tokens"), ("_kernel", "first_kernel", "tokens_kernel"))
    for r in seen:
        sent = truth.get(r.get("key") or "", {})
        true_tokens = sent.get("token_ns") or []
        n = len(true_tokens)
        for suffix, first_key, tokens_key in stamps:
            first = r.get(first_key)
            if first is not None and sent.get("first_token_ns") is not None:
                out["ttft" + suffix].append((first - sent["first_token_ns"]) / 1e6)
            tokens = [t for t in (r.get(tokens_key) or []) if t is not None][-n:] if n else []
            if n >= 2 and len(tokens) == n:
                out["itl" + suffix] += [
                    ((tokens[k] - tokens[k - 1]) - (true_tokens[k] - true_tokens[k - 1])) / 1e6
                    for k in range(1, n)
                ]
    return out


def _seen(records: list[RequestRecord]) -> list[dict[str, Any]]:
    return [
        {
            "key": r.extra.get("response_id"),
            "first": r.t_first_token,
            "first_kernel": r.t_first_token_kernel,
            "tokens": [t for t, _ in r.extra.get("token_ns", [])],
            "tokens_kernel": [k for _, k in r.extra.get("token_ns", [])],
        }
        for r in records
    ]


def _abs_p99(values: list[float]) -> float | None:
    return _rounded(_percentile([abs(v) for v in values], 0.99))


async def _level(timed: StreamingClient, fast: StreamingClient, concurrency: int, n: int) -> Level:
    for client in (timed, fast):  # open the connections; their setup is not what we measure
        await _closed_loop(client, concurrency, concurrency)
    await timed.get_json("/stub/truth")  # forget the warm-up
    records, _, cpu_s = await _closed_loop(timed, concurrency, n)
    truth = await timed.get_json("/stub/truth")
    fast_records, wall_ns, _ = await _closed_loop(fast, concurrency, n)
    await fast.get_json("/stub/truth")
    failures = [r for r in records + fast_records if not r.ok]
    chunks = _chunks_sent(len(records), TIMED.output_tokens)
    errors = errors_against_truth(_seen(records), truth)
    headers = [
        (r.t_headers - truth[r.extra["response_id"]]["headers_ns"]) / 1e6
        for r in records
        if r.t_headers is not None and r.extra.get("response_id") in truth
    ]
    lag = [
        (r.t_first_token - r.t_first_token_kernel) / 1e6
        for r in records
        if r.t_first_token is not None and r.t_first_token_kernel is not None
    ]
    parsed = sum(r.chunks for r in records)
    offered = round(concurrency * 1000 / TIMED.inter_token_delay_ms)
    ceiling = round(_chunks_sent(len(fast_records), FAST.output_tokens) / (wall_ns / 1e9))
    return Level(
        concurrency=concurrency,
        requests=n,
        errors=len(failures),
        client_cpu_us_per_chunk=_rounded(cpu_s / chunks * 1e6 if chunks else None),
        parse_cpu_us_per_chunk=_rounded(
            sum(r.parse_s for r in records) / parsed * 1e6 if parsed else None
        ),
        client_build_cpu_us=_rounded(sum(r.build_s for r in records) / len(records) * 1e6),
        offered_chunks_per_s=offered,
        max_chunks_per_s=ceiling,
        past_ceiling=offered > CEILING_SHARE * ceiling,
        ttft_error_ms_p50=_rounded(_percentile(errors["ttft"], 0.5)),
        ttft_error_ms_p99=_rounded(_percentile(errors["ttft"], 0.99)),
        ttft_error_kernel_ms_p50=_rounded(_percentile(errors["ttft_kernel"], 0.5)),
        ttft_error_kernel_ms_p99=_rounded(_percentile(errors["ttft_kernel"], 0.99)),
        itl_error_ms_p99=_abs_p99(errors["itl"]),
        itl_error_kernel_ms_p99=_abs_p99(errors["itl_kernel"]),
        headers_error_ms_p50=_rounded(_percentile(headers, 0.5)),
        headers_error_ms_p99=_rounded(_percentile(headers, 0.99)),
        client_lag_ms_p50=_rounded(_percentile(lag, 0.5)),
        client_lag_ms_p99=_rounded(_percentile(lag, 0.99)),
        shared_stamps_pct=_rounded(
            100 * sum(r.shared_stamps for r in records) / parsed if parsed else None
        ),
        first_error=failures[0].error if failures else None,
    )


def _note(cpus: int) -> str:
    return (
        f"the stub runs in child processes on the same {cpus} CPUs as the client: "
        "max_chunks_per_s is for client and stub together, a lower bound for the client "
        "alone; a level past the ceiling (offered above "
        f"{CEILING_SHARE:.0%} of it) measures the client falling behind, which the loop's "
        "stamps carry and the kernel's do not"
    )


def ceiling_line(result: Calibration) -> str | None:
    """The line that names the levels past the ceiling; None when there are none."""
    past = [str(level.concurrency) for level in result.levels if level.past_ceiling]
    if not past:
        return None
    return (
        f"Past the ceiling at concurrency {', '.join(past)}: the offered rate is above "
        f"{CEILING_SHARE:.0%} of what client and stub can do together here; the loop's "
        "stamps there include the client falling behind, the kernel's do not. A run whose "
        "chunk rate is that high measures this machine as much as the server."
    )


def failed(result: Calibration | PeersResult) -> bool:
    """Whether any request failed (the numbers are then suspect, and no ceiling is kept)."""
    rows = result.levels if isinstance(result, Calibration) else result.peers
    return any(row.errors for row in rows)


async def run_calibration(
    concurrencies: list[int], requests_per_level: int | None = None
) -> Calibration:
    """Measure every level against fresh stub processes; the result is what --json prints."""
    limit = max(concurrencies)
    with StubServer(TIMED, process=True) as timed_stub, StubServer(FAST, process=True) as fast_stub:
        async with (
            StreamingClient(timed_stub.url, max_connections=limit, keep_chunks=True) as timed,
            StreamingClient(fast_stub.url, max_connections=limit) as fast,
        ):
            kernel = timed.kernel_stamps
            levels = [
                await _level(timed, fast, c, requests_per_level or max(32, 4 * c))
                for c in concurrencies
            ]
            clock, steps = timed.clock, timed.clock_steps
    cpus = os.cpu_count() or 1
    return Calibration(
        timed_stub=StubTimings(
            headers_delay_ms=TIMED.headers_delay_ms,
            first_token_delay_ms=TIMED.first_token_delay_ms,
            inter_token_delay_ms=TIMED.inter_token_delay_ms,
            output_tokens=TIMED.output_tokens,
        ),
        cpus=cpus,
        kernel_stamps=kernel,
        clock_conversion_error_us=round(clock.error_ns / 1e3, 3),
        clock_steps=steps,
        note=_note(cpus),
        levels=levels,
    )


def peers(
    streams: list[int],
    requests_per_level: int | None = None,
    clients: tuple[str, ...] = PEERS,
    repeat: int = 1,
) -> PeersResult:
    """Every client that can run here, at each level, against one timed and one fast stub,
    the order alternating between levels and repeats; the result is what `calibrate --peers
    --json` prints. A client's TTFT and ITL errors are those of the times it reports: for
    cputax the kernel's receive stamps (the loop's are kept beside them), for the others
    their loop's. With repeats, each figure is the median over them."""
    runnable, skipped = [], []
    for client in clients:
        why = available(client)
        if why:
            skipped.append(Skipped(client=client, why=why))
        else:
            runnable.append(client)
    runs: dict[tuple[str, int], list[PeerRun]] = {}
    with (
        StubServer(TIMED, process=True) as timed_stub,
        StubServer(replace(FAST, token_truth=False), process=True) as fast_stub,
    ):
        turn = 0
        for _ in range(repeat):
            for n_streams in streams:
                n = requests_per_level or max(32, 4 * n_streams)
                order = runnable if turn % 2 == 0 else list(reversed(runnable))
                turn += 1
                for client in order:
                    runs.setdefault((client, n_streams), []).append(
                        _peer_once(client, timed_stub.url, fast_stub.url, n_streams, n)
                    )
    rows = [
        _median_row(found, runs.get(("cputax", n_streams)))
        for (_, n_streams), found in runs.items()
    ]
    rows.sort(key=lambda r: (r.streams, r.client != "cputax", r.client))
    cpus = os.cpu_count() or 1
    return PeersResult(
        peers=rows,
        skipped=skipped,
        cpus=cpus,
        cpu_model=cpu_model(),
        repeat=repeat,
        timed_stub=msgspec.convert(asdict(TIMED), PeerStub),
        note=_note(cpus),
    )


def _peer_once(client: str, timed_url: str, fast_url: str, n_streams: int, n: int) -> PeerRun:
    asyncio.run(_forget(timed_url))
    timed_run = run_peer(client, timed_url, TIMED.model, n_streams, n, TIMED.output_tokens)
    truth = asyncio.run(_forget(timed_url))
    fast_run = run_peer(client, fast_url, FAST.model, n_streams, n, FAST.output_tokens)
    asyncio.run(_forget(fast_url))
    errors = errors_against_truth(timed_run.requests, truth)
    kernel = bool(errors["ttft_kernel"])
    reported = "_kernel" if kernel else ""
    chunks = _chunks_sent(len(timed_run.requests), TIMED.output_tokens)
    fast_chunks = _chunks_sent(len(fast_run.requests), FAST.output_tokens)
    return PeerRun(
        client=client,
        streams=n_streams,
        requests=n,
        stamps="kernel" if kernel else "loop",
        errors=sum(not r["ok"] for r in timed_run.requests + fast_run.requests),
        cpu_us_per_chunk=_rounded(timed_run.cpu_s / chunks * 1e6),
        ttft_error_ms_p50=_rounded(_percentile(errors["ttft" + reported], 0.5)),
        ttft_error_ms_p99=_rounded(_percentile(errors["ttft" + reported], 0.99)),
        itl_error_ms_p99=_abs_p99(errors["itl" + reported]),
        ttft_error_loop_ms_p99=_rounded(_percentile(errors["ttft"], 0.99)),
        itl_error_loop_ms_p99=_abs_p99(errors["itl"]),
        max_chunks_per_s=round(fast_chunks / (fast_run.wall_ns / 1e9)),
    )


def paired_ratios(theirs: list[PeerRun], ours: list[PeerRun]) -> PairedRatios:
    """Each figure's ratio to cputax's, repeat by repeat (the two ran one after the other,
    so a machine that drifts between repeats moves both): the median, and for the CPU
    the range over repeats."""
    pairs: dict[str, list[float]] = {}
    for key in _RATIOS:
        both = [(getattr(t, key), getattr(o, key)) for t, o in zip(theirs, ours, strict=True)]
        pairs[key] = [t / o for t, o in both if t and o]
    median = {
        key: _rounded(percentile(found, 50), 2) if found else None for key, found in pairs.items()
    }
    cpu = pairs["cpu_us_per_chunk"]
    return PairedRatios(
        **median, cpu_us_per_chunk_range=([round(min(cpu), 2), round(max(cpu), 2)] if cpu else None)
    )


def _median_row(found: list[PeerRun], ours: list[PeerRun] | None) -> PeerRow:
    """A client's repeats at one level as one row: each figure the median over them, the
    errors summed; beside cputax's repeats (`ours`), its ratios to them."""
    first = found[0]
    medians = {}
    for key in _MEDIANS:
        values = [getattr(f, key) for f in found if getattr(f, key) is not None]
        medians[key] = _rounded(percentile(values, 50)) if values else None
    cpu = [f.cpu_us_per_chunk for f in found if f.cpu_us_per_chunk is not None]
    return PeerRow(
        client=first.client,
        streams=first.streams,
        requests=first.requests,
        stamps=first.stamps,
        errors=sum(f.errors for f in found),
        **medians,
        runs=len(found),
        cpu_us_per_chunk_range=[min(cpu), max(cpu)] if cpu else None,
        vs_cputax=paired_ratios(found, ours) if ours and first.client != "cputax" else None,
    )


def ceiling_path() -> Path:
    return default_cache_dir() / "calibration.json"


def save_ceiling(result: Calibration, path: Path | None = None) -> Path:
    """Keep the machine's ceiling (the most chunks/s client and stub took in together) where
    `cputax run` finds it, to tell a run whose chunk rate came near it."""
    path = path or ceiling_path()
    Ceiling(
        max_chunks_per_s=max(level.max_chunks_per_s for level in result.levels),
        share=CEILING_SHARE,
        cpus=result.cpus,
        cpu_model=cpu_model(),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    ).dump(path)
    return path


def load_ceiling(path: Path | None = None) -> Ceiling | None:
    """The ceiling `cputax calibrate` last measured on this machine (None: never, or another
    CPU). A file this cputax cannot read (another version, not JSON) is ignored too, with a
    line on stderr: `cputax run` never fails for it."""
    path = path or ceiling_path()
    if not path.exists():
        return None
    try:
        ceiling = Ceiling.load(path)
    except CputaxError as exc:
        print(f"cputax: client ceiling ignored: {exc}", file=sys.stderr)
        return None
    if ceiling.cpu_model != cpu_model() or ceiling.cpus != os.cpu_count():
        return None
    return ceiling


async def _forget(url: str) -> dict[str, Any]:
    """The stub's truth so far, which it forgets once read."""
    async with StreamingClient(url) as client:
        return await client.get_json("/stub/truth")
