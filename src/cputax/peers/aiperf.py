"""NVIDIA's AIPerf as a peer client: `aiperf profile`, as a user runs it, against the stub.

What is compared is what it reports per request in its profile_export.jsonl (the one file
of it cputax reads): the X-Request-ID it sent (the stub keys its truth by it), the
start, the time to first token and the gaps between chunks. Its times are perf_counter
(CLOCK_MONOTONIC) anchored to the wall clock once per request; they are brought back to
the monotonic clock with one `wire.Clock` read after the run. Its CPU: peers.process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson

from cputax.client.wire import Clock
from cputax.peers.process import find_cli, run_cli, tokenizer_dir

__all__ = ["ENV", "command", "find", "parse_export", "run"]

ENV = "CPUTAX_AIPERF"


def find() -> str | None:
    """The `aiperf` executable: $CPUTAX_AIPERF, else on PATH."""
    return find_cli(ENV, "aiperf")


def command(
    exe: str, url: str, model: str, streams: int, requests: int, tokens: int, out: Path
) -> list[str]:
    """`aiperf profile` for this load: streaming chat, a closed loop of `streams`, one
    warm-up request per stream, a short synthetic prompt, no UI."""
    return [
        exe,
        "profile",
        "--model",
        model,
        "--url",
        url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        tokenizer_dir(),
        "--concurrency",
        str(streams),
        "--request-count",
        str(requests),
        "--warmup-request-count",
        str(streams),
        "--prompt-input-tokens-mean",
        "32",
        "--prompt-output-tokens-mean",
        str(tokens),
        "--output-artifact-dir",
        str(out),
        "--ui-type",
        "none",
        "--no-auto-plot",
    ]


def run(url: str, model: str, streams: int, requests: int, tokens: int) -> dict[str, Any]:
    """One AIPerf run: its profiling requests, the phase's wall time and its tree's CPU."""
    exe = find()
    if exe is None:
        raise RuntimeError(f"aiperf not found (set {ENV} or put it on PATH)")
    with tempfile.TemporaryDirectory(prefix="cputax-aiperf-") as tmp:
        out = Path(tmp)
        cpu = run_cli("aiperf", command(exe, url, model, streams, requests, tokens, out), out)
        found = parse_export(out / "profile_export.jsonl", Clock.measure())
    if not found["requests"]:
        raise RuntimeError("aiperf wrote no profiling records")
    start, end = found.pop("start_ns"), found.pop("end_ns")
    return {**found, "wall_ns": end - start, "cpu_s": cpu.between(start, end)}


def parse_export(path: Path, clock: Clock) -> dict[str, Any]:
    """AIPerf's per-request records of its profiling phase, as peers compares them: key,
    ok, error, first (monotonic ns), tokens (first + each gap between chunks); and the
    phase's start and end (monotonic ns)."""
    requests: list[dict[str, Any]] = []
    start = end = None
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        record = orjson.loads(line)
        meta = record.get("metadata") or {}
        if meta.get("benchmark_phase") != "profiling":
            continue
        metrics = record.get("metrics") or {}
        t0 = clock.monotonic(meta["request_start_ns"])
        t1 = clock.monotonic(meta.get("request_end_ns") or meta["request_start_ns"])
        start, end = min(start or t0, t0), max(end or t1, t1)
        error = record.get("error")
        ttft = (metrics.get("time_to_first_token") or {}).get("value")
        first = t0 + round(ttft * 1e6) if ttft is not None else None
        tokens: list[int] = []
        if first is not None:
            tokens.append(first)
            for gap in (metrics.get("inter_chunk_latency") or {}).get("value") or []:
                tokens.append(tokens[-1] + round(gap * 1e6))
        requests.append(
            {
                "key": meta.get("x_request_id"),
                "ok": error is None and first is not None,
                "error": (error or {}).get("message") if isinstance(error, dict) else error,
                "first": first,
                "first_kernel": None,
                "tokens": tokens,
                "tokens_kernel": [],
            }
        )
    return {"requests": requests, "start_ns": start or 0, "end_ns": end or 0}
