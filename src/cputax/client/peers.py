"""Load clients side by side against one stub: cputax and vLLM's own benchmark client.

Each client runs in a process of its own (`python -m cputax.client.peers CLIENT ...`),
a closed loop of `streams` workers, and prints what it saw: per request, the stub's key
for it and the times of its tokens, and the CPU (user + system, every thread of it and
any child it waited for: its whole process tree) over the timed loop, start-up and
imports left out. The parent compares each client's times with the stub's own send
times (GET /stub/truth).

vLLM's client is `vllm.benchmarks.lib.endpoint_request_func.async_request_openai_chat_completions`
(installed with the [local] extra); its times are `time.perf_counter()`, CLOCK_MONOTONIC
on Linux like the stub's, and it sends `x-request-id`, which the stub keys its truth by.
AIPerf and guidellm are not driven yet: they are named and skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["AIOHTTP", "PEERS", "PeerRun", "available", "run_peer"]

PEERS = ("cputax", "vllm-bench", "aiperf", "guidellm")
# cputax streaming through aiohttp instead of its own HTTP/1.1 path (loop stamps only): the
# other way the kernel stamps could have gone, measured beside it (bench/bench_client.py --aiohttp)
AIOHTTP = "cputax-aiohttp"
MESSAGES = [
    {"role": "system", "content": "You are a coding agent. Use the tools to read, edit and test code."},
    {"role": "user", "content": "Run the test suite and fix the first failing test in src/parser.py."},
]
RUN_TIMEOUT_S = 900.0


def available(client: str) -> str | None:
    """None when the client can run here, else one line saying why not."""
    if client in ("cputax", AIOHTTP):
        return None
    if client == "vllm-bench":
        return None if importlib.util.find_spec("vllm") else "vLLM is not installed (the [local] extra brings it)"
    module = {"aiperf": "aiperf", "guidellm": "guidellm"}.get(client)
    if module is None:
        return f"unknown client {client!r} (one of {', '.join(PEERS)})"
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {module})"
    return "installed, but cputax does not drive it yet (its per-request times are not matched to the stub's)"


@dataclass
class PeerRun:
    client: str
    streams: int
    requests: list[dict[str, Any]]  # key, ok, error, first (loop ns), first_kernel, tokens [loop ns], tokens_kernel
    wall_ns: int
    cpu_s: float  # user + system of the client's whole process tree


def run_peer(client: str, url: str, model: str, streams: int, requests: int, tokens: int) -> PeerRun:
    """One client's closed loop against `url`, in a child process."""
    cmd = [sys.executable, "-m", "cputax.client.peers", client, url, model, str(streams), str(requests), str(tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{client} exited with {proc.returncode}: {' / '.join(tail)}")
    result = orjson.loads(out.splitlines()[-1])
    return PeerRun(client, streams, result["requests"], result["wall_ns"], result["cpu_s"])


# --- the child side ---------------------------------------------------------------------------
def _import_cputax() -> None:
    from cputax.client import stream  # noqa: F401


async def _cputax(url: str, model: str, streams: int, n: int, tokens: int, wire: bool = True) -> list[dict[str, Any]]:
    from cputax.client.stream import StreamingClient
    from cputax.records import RequestRecord

    payload = {"model": model, "messages": MESSAGES, "max_tokens": tokens}
    out: list[dict[str, Any]] = []
    indices = iter(range(n))
    async with StreamingClient(url, max_connections=streams, keep_chunks=True, wire=wire) as client:

        async def worker() -> None:
            for i in indices:
                r = await client.send(RequestRecord("peer", index=i), lambda: payload)
                stamps = r.extra.get("token_ns", [])
                out.append({"key": r.extra.get("response_id"), "ok": r.ok, "error": r.error,
                            "first": r.t_first_token, "first_kernel": r.t_first_token_kernel,
                            "tokens": [t for t, _ in stamps], "tokens_kernel": [k for _, k in stamps]})

        await asyncio.gather(*(worker() for _ in range(streams)))
    return out


def _import_vllm_bench() -> None:
    """vLLM's imports take seconds of CPU: done before the timed loop starts."""
    from vllm.benchmarks.lib import endpoint_request_func  # noqa: F401


async def _vllm_bench(url: str, model: str, streams: int, n: int, tokens: int) -> list[dict[str, Any]]:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    out: list[dict[str, Any]] = []
    indices = iter(range(n))
    # as `vllm bench serve` opens it: one session, a connector sized to the concurrency
    connector = aiohttp.TCPConnector(limit=streams, limit_per_host=streams, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trust_env=True,
                                     timeout=aiohttp.ClientTimeout(total=6 * 60 * 60)) as session:

        async def worker() -> None:
            for i in indices:
                key = f"peer-{i}"
                inp = RequestFuncInput(prompt=MESSAGES[-1]["content"], api_url=url + "/v1/chat/completions",
                                       prompt_len=0, output_len=tokens, model=model, chat_messages=MESSAGES,
                                       request_id=key)
                r = await async_request_openai_chat_completions(inp, session)
                first = r.start_time + r.ttft
                times, t = [first], first
                for gap in r.itl:
                    t += gap
                    times.append(t)
                ns = [int(x * 1e9) for x in times]
                out.append({"key": key, "ok": r.success, "error": r.error or None, "first": ns[0] if r.success else None,
                            "first_kernel": None, "tokens": ns, "tokens_kernel": []})

        await asyncio.gather(*(worker() for _ in range(streams)))
    return out


def _child(argv: list[str]) -> int:
    client, url, model = argv[0], argv[1], argv[2]
    streams, n, tokens = int(argv[3]), int(argv[4]), int(argv[5])
    async def over_aiohttp(*args: Any) -> list[dict[str, Any]]:
        return await _cputax(*args, wire=False)

    run, prepare = {"cputax": (_cputax, _import_cputax), AIOHTTP: (over_aiohttp, _import_cputax),
                    "vllm-bench": (_vllm_bench, _import_vllm_bench)}.get(client, (None, None))
    if run is None or prepare is None:
        print(f"cputax peers: {client}: {available(client)}", file=sys.stderr)
        return 2
    prepare()
    start, cpu = time.monotonic_ns(), os.times()
    requests = asyncio.run(run(url, model, streams, n, tokens))
    wall, end = time.monotonic_ns() - start, os.times()
    cpu_s = (end.user - cpu.user) + (end.system - cpu.system) + (end.children_user - cpu.children_user) \
        + (end.children_system - cpu.children_system)
    sys.stdout.buffer.write(orjson.dumps({"requests": requests, "wall_ns": wall, "cpu_s": cpu_s}) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
