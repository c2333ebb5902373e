"""Load clients side by side against one stub: cputax, vLLM's own benchmark client,
AIPerf, guidellm.

Each client runs in a process of its own (`python -m cputax.peers.clients CLIENT ...`),
a closed loop of `streams` workers, and prints what it saw: per request, the stub's key
for it and the times of its tokens, and the CPU (user + system, every thread of it and
any child it waited for: its whole process tree) over the timed loop. Start-up, imports
and a first round of one request per stream (connections opened) are left out, alike
for every client. The parent compares each client's times with the stub's own send
times (GET /stub/truth).

vLLM's client is `vllm.benchmarks.lib.endpoint_request_func.async_request_openai_chat_completions`
(installed with the [local] extra); its times are `time.perf_counter()`, CLOCK_MONOTONIC
on Linux like the stub's, and it sends `x-request-id`, which the stub keys its truth by.
AIPerf and guidellm run as their own command lines, from their own environments
(peers.aiperf, peers.guidellm, peers.process).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import resource
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from cputax.client.heap import steady_heap

__all__ = ["AIOHTTP", "PEERS", "PeerRun", "available", "run_peer"]

PEERS = ("cputax", "vllm-bench", "aiperf", "guidellm")
# cputax streaming through aiohttp instead of its own HTTP/1.1 path (loop stamps only): the
# other way the kernel stamps could have gone, measured beside it (bench/bench_client.py --aiohttp)
AIOHTTP = "cputax-aiohttp"
MESSAGES = [
    {
        "role": "system",
        "content": "You are a coding agent. Use the tools to read, edit and test code.",
    },
    {
        "role": "user",
        "content": "Run the test suite and fix the first failing test in src/parser.py.",
    },
]
RUN_TIMEOUT_S = 900.0


def available(client: str) -> str | None:
    """None when the client can run here, else one line saying why not."""
    if client in ("cputax", AIOHTTP):
        return None
    if client == "vllm-bench":
        return (
            None
            if importlib.util.find_spec("vllm")
            else "vLLM is not installed (the [local] extra brings it)"
        )
    cli = _cli(client)
    if cli is None:
        return f"unknown client {client!r} (one of {', '.join(PEERS)})"
    if cli.find():
        return None
    named = os.environ.get(cli.ENV)
    if named:
        return f"${cli.ENV} is {named}, which is not an executable file"
    return (
        f"not found: install it in a venv of its own (pip install {client}) "
        f"and put its {client} on PATH or in ${cli.ENV}"
    )


def _cli(client: str) -> Any:
    """The module that drives a peer with a command line of its own, None for another name."""
    if client == "aiperf":
        from cputax.peers import aiperf as peer_aiperf

        return peer_aiperf
    if client == "guidellm":
        from cputax.peers import guidellm as peer_guidellm

        return peer_guidellm
    return None


@dataclass
class PeerRun:
    client: str
    streams: int
    requests: list[
        dict[str, Any]
    ]  # key, ok, error, first (loop ns), first_kernel, tokens [loop ns], tokens_kernel
    wall_ns: int
    cpu_s: float  # user + system of the client's whole process tree


def run_peer(
    client: str, url: str, model: str, streams: int, requests: int, tokens: int
) -> PeerRun:
    """One client's closed loop against `url`, in a child process."""
    cli = _cli(client)
    if cli is not None:
        result = cli.run(url, model, streams, requests, tokens)
        return PeerRun(client, streams, result["requests"], result["wall_ns"], result["cpu_s"])
    cmd = [
        sys.executable,
        "-m",
        "cputax.peers.clients",
        client,
        url,
        model,
        str(streams),
        str(requests),
        str(tokens),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{client} exited with {proc.returncode}: {' / '.join(tail)}")
    result = orjson.loads(out.splitlines()[-1])
    return PeerRun(client, streams, result["requests"], result["wall_ns"], result["cpu_s"])


# --- the child side ---------------------------------------------------------------------------
Send = Callable[[int], Awaitable[dict[str, Any]]]


@dataclass
class _Timed:
    requests: list[dict[str, Any]]
    wall_ns: int
    cpu_s: float


async def _closed_loop(send: Send, streams: int, indices: range) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    todo = iter(indices)

    async def worker() -> None:
        for i in todo:
            out.append(await send(i))

    await asyncio.gather(*(worker() for _ in range(streams)))
    return out


async def _measured(send: Send, streams: int, n: int, steady: bool) -> _Timed:
    """A round of one request per stream first, then `n` requests on the clock: every client
    opens its connections and pays its first request's costs before the clock starts, so
    the CPU is per chunk in the steady state. `steady`: cputax collects and freezes its
    heap then, as a run does before a scenario (client.heap)."""
    await _closed_loop(send, streams, range(-streams, 0))
    with steady_heap() if steady else contextlib.nullcontext():
        start, cpu = time.monotonic_ns(), _tree_cpu_s()
        requests = await _closed_loop(send, streams, range(n))
        wall, cpu_s = time.monotonic_ns() - start, _tree_cpu_s() - cpu
    return _Timed(requests, wall, cpu_s)


def _tree_cpu_s() -> float:
    """User + system seconds of this process and the children it waited for, to the
    microsecond (os.times counts in clock ticks: 10 ms, a few per cent of a short run)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _import_cputax() -> None:
    from cputax.client import stream  # noqa: F401


async def _cputax(
    url: str, model: str, streams: int, n: int, tokens: int, wire: bool = True
) -> _Timed:
    from cputax.client.stream import StreamingClient
    from cputax.records import RequestRecord

    payload = {"model": model, "messages": MESSAGES, "max_tokens": tokens}
    async with StreamingClient(url, max_connections=streams, keep_chunks=True, wire=wire) as client:

        async def send(i: int) -> dict[str, Any]:
            r = await client.send(RequestRecord("peer", index=i), lambda: payload)
            stamps = r.extra.get("token_ns", [])
            return {
                "key": r.extra.get("response_id"),
                "ok": r.ok,
                "error": r.error,
                "first": r.t_first_token,
                "first_kernel": r.t_first_token_kernel,
                "tokens": [t for t, _ in stamps],
                "tokens_kernel": [k for _, k in stamps],
            }

        return await _measured(send, streams, n, steady=True)


def _import_vllm_bench() -> None:
    """vLLM's imports take seconds of CPU: done before the timed loop starts."""
    from vllm.benchmarks.lib import endpoint_request_func  # noqa: F401


async def _vllm_bench(url: str, model: str, streams: int, n: int, tokens: int) -> _Timed:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    # as `vllm bench serve` opens it: one session, a connector sized to the concurrency
    connector = aiohttp.TCPConnector(limit=streams, limit_per_host=streams, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=connector, trust_env=True, timeout=aiohttp.ClientTimeout(total=6 * 60 * 60)
    ) as session:

        async def send(i: int) -> dict[str, Any]:
            key = f"peer-{i}"
            inp = RequestFuncInput(
                prompt=MESSAGES[-1]["content"],
                api_url=url + "/v1/chat/completions",
                prompt_len=0,
                output_len=tokens,
                model=model,
                chat_messages=MESSAGES,
                request_id=key,
            )
            r = await async_request_openai_chat_completions(inp, session)
            first = r.start_time + r.ttft
            times, t = [first], first
            for gap in r.itl:
                t += gap
                times.append(t)
            ns = [int(x * 1e9) for x in times]
            return {
                "key": key,
                "ok": r.success,
                "error": r.error or None,
                "first": ns[0] if r.success else None,
                "first_kernel": None,
                "tokens": ns,
                "tokens_kernel": [],
            }

        return await _measured(send, streams, n, steady=False)


def _child(argv: list[str]) -> int:
    client, url, model = argv[0], argv[1], argv[2]
    streams, n, tokens = int(argv[3]), int(argv[4]), int(argv[5])

    async def over_aiohttp(*args: Any) -> _Timed:
        return await _cputax(*args, wire=False)

    run, prepare = {
        "cputax": (_cputax, _import_cputax),
        AIOHTTP: (over_aiohttp, _import_cputax),
        "vllm-bench": (_vllm_bench, _import_vllm_bench),
    }.get(client, (None, None))
    if run is None or prepare is None:
        print(f"cputax peers: {client}: {available(client)}", file=sys.stderr)
        return 2
    prepare()
    timed = asyncio.run(run(url, model, streams, n, tokens))
    sys.stdout.buffer.write(
        orjson.dumps({"requests": timed.requests, "wall_ns": timed.wall_ns, "cpu_s": timed.cpu_s})
        + b"\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
