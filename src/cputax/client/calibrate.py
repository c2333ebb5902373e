"""`cputax calibrate`: the client's own floor, measured against the stub's known timings.

Two stubs run as child processes (StubServer(process=True)). In a thread of
this process the stub would take the GIL from the client, and every stall of
one would show up as timing error of the other; as a process it only shares the
CPUs, which the output says. The truth crosses over through GET /stub/truth:
both processes read CLOCK_MONOTONIC, so the client's timestamps subtract from
the stub's directly.

- The timed stub (TIMED) answers like a fast server: headers after 5 ms, first
  token 20 ms later, then one token every 5 ms (200 tokens/s per stream), 64
  tokens. Against it we measure the client's TTFT and headers error (client
  timestamp minus the stub's true send time) and its parse CPU per chunk.
  Its offered chunk rate is concurrency x 200/s; where that exceeds what the
  client can take, the error includes the client falling behind, on purpose.
- The fast stub (FAST) has no delays: total chunks / wall time at a level is
  the most the client (with the stub beside it) can take in.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import asdict
from typing import Any

from cputax.client.stream import StreamingClient
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig, StubServer
from cputax.util import percentile

TIMED = StubConfig(headers_delay_ms=5.0, first_token_delay_ms=20.0, inter_token_delay_ms=5.0, output_tokens=64)
FAST = StubConfig(output_tokens=64)
_MESSAGES = [
    {"role": "system", "content": "You are a coding agent. Use the tools to read, edit and test code."},
    {"role": "user", "content": "Run the test suite and fix the first failing test in src/parser.py."},
]
KEYS = ("concurrency", "requests", "errors", "client_cpu_us_per_chunk", "client_build_cpu_us",
        "offered_chunks_per_s", "max_chunks_per_s", "ttft_error_ms_p50", "ttft_error_ms_p99",
        "headers_error_ms_p50", "headers_error_ms_p99")


def _payload() -> dict[str, Any]:
    return {"model": TIMED.model, "messages": _MESSAGES, "max_tokens": TIMED.output_tokens}


def _percentile(values: list[float], q: float) -> float | None:
    """None for no data, else the shared percentile (q in 0..1 here)."""
    return percentile(values, 100 * q) if values else None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


async def _closed_loop(client: StreamingClient, concurrency: int, n: int) -> tuple[list[RequestRecord], int]:
    """n requests, `concurrency` at a time, each worker sending its next as soon as one ends; (records, wall ns)."""
    records: list[RequestRecord] = []
    indices = iter(range(n))

    async def worker() -> None:
        for i in indices:
            records.append(await client.send(RequestRecord("calibrate", index=i), _payload))

    start = time.monotonic_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.monotonic_ns() - start


def _errors_ms(records: list[RequestRecord], truth: dict[str, dict[str, int]], ours: str, theirs: str) -> list[float]:
    errors = []
    for record in records:
        sent = truth.get(record.extra.get("response_id", ""), {}).get(theirs)
        seen = getattr(record, ours)
        if sent is not None and seen is not None:
            errors.append((seen - sent) / 1e6)
    return errors


async def _level(timed: StreamingClient, fast: StreamingClient, concurrency: int, n: int) -> dict[str, Any]:
    for client in (timed, fast):  # open the connections; their setup is not what we measure
        await _closed_loop(client, concurrency, concurrency)
    await timed.get_json("/stub/truth")  # forget the warm-up
    records, _ = await _closed_loop(timed, concurrency, n)
    truth = await timed.get_json("/stub/truth")
    fast_records, wall_ns = await _closed_loop(fast, concurrency, n)
    await fast.get_json("/stub/truth")
    failed = [r for r in records + fast_records if not r.ok]
    chunks = sum(r.chunks for r in records)
    ttft = _errors_ms(records, truth, "t_first_token", "first_token_ns")
    headers = _errors_ms(records, truth, "t_headers", "headers_ns")
    level = {
        "concurrency": concurrency,
        "requests": n,
        "errors": len(failed),
        "client_cpu_us_per_chunk": _rounded(sum(r.parse_s for r in records) / chunks * 1e6 if chunks else None),
        "client_build_cpu_us": _rounded(sum(r.build_s for r in records) / len(records) * 1e6),
        "offered_chunks_per_s": round(concurrency * 1000 / TIMED.inter_token_delay_ms),
        "max_chunks_per_s": round(sum(r.chunks for r in fast_records) / (wall_ns / 1e9)),
        "ttft_error_ms_p50": _rounded(_percentile(ttft, 0.5)),
        "ttft_error_ms_p99": _rounded(_percentile(ttft, 0.99)),
        "headers_error_ms_p50": _rounded(_percentile(headers, 0.5)),
        "headers_error_ms_p99": _rounded(_percentile(headers, 0.99)),
    }
    if failed:
        level["first_error"] = failed[0].error
    return level


async def run_calibration(concurrencies: list[int], requests_per_level: int | None = None) -> dict[str, Any]:
    """Measure every level against fresh stub processes; the result is what --json prints."""
    limit = max(concurrencies)
    with StubServer(TIMED, process=True) as timed_stub, StubServer(FAST, process=True) as fast_stub:
        async with StreamingClient(timed_stub.url, max_connections=limit) as timed, \
                StreamingClient(fast_stub.url, max_connections=limit) as fast:
            levels = [await _level(timed, fast, c, requests_per_level or max(32, 4 * c)) for c in concurrencies]
    cpus = os.cpu_count() or 1
    return {
        "timed_stub": {k: v for k, v in asdict(TIMED).items() if k.endswith("_ms") or k == "output_tokens"},
        "cpus": cpus,
        "note": f"the stub runs in child processes on the same {cpus} CPUs as the client: "
                "max_chunks_per_s is for client and stub together, a lower bound for the client alone; "
                "TTFT error includes the client falling behind where offered_chunks_per_s exceeds it",
        "levels": levels,
    }
