"""Host telemetry through psutil and /proc: CPU of the server's processes and threads,
system CPU and context switches. Always on; it needs no GPU.

Per thread it reads /proc/PID/task/TID/schedstat: nanoseconds on a CPU, nanoseconds
waiting for one (run-queue delay: the server had work but no core) and the number of
times it was scheduled in. That is finer than the 10 ms ticks of cpu_times and costs
one small read per thread. Thread CPU is written only for threads whose values moved
since the last poll (a server with hundreds of idle threads stays small on disk);
a thread absent from a sample did not run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import psutil

from cputax.telemetry.base import Sample, sample_kind
from cputax.util import percentile, redact

REFRESH_NS = 1_000_000_000  # look for new child processes (EngineCore, workers) this often


@sample_kind
class ProcInfo(Sample, tag="proc_info"):
    """A process of the server's family, when first seen (its role is the family's)."""

    pid: int
    role: str
    name: str
    ppid: int | None = None
    cmdline: list[str] = []


@sample_kind
class Proc(Sample, tag="proc"):
    """A process's cumulative CPU and context switches, and per thread whose values moved
    since the last poll: [run_ns, wait_ns, slices] (None where only ticks are known)."""

    pid: int
    role: str
    cpu_s: float
    user_s: float | None = None
    sys_s: float | None = None
    ctx_vol: int | None = None
    ctx_invol: int | None = None
    threads: dict[str, list[int | None]] = {}


@sample_kind
class ThreadNames(Sample, tag="thread_names"):
    """Names of a process's threads first seen in this poll (tid -> comm)."""

    pid: int
    names: dict[str, str]


@sample_kind
class System(Sample, tag="system"):
    """The whole machine's cumulative CPU seconds (busy and total) and context switches."""

    busy_s: float
    total_s: float
    ctx: int | None = None
    cpus: int | None = None


def _read_schedstat(path: str) -> tuple[int, int, int] | None:
    try:
        with open(path, "rb") as fh:
            run, wait, slices = fh.read().split()[:3]
        return int(run), int(wait), int(slices)
    except (OSError, ValueError):
        return None  # the thread exited between listing and reading


def _comm(pid: int, tid: int) -> str:
    try:
        return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    except OSError:
        return "?"


class HostPoller:
    """Per process (and its descendants) and per thread CPU, plus the whole machine."""

    name = "host"

    def __init__(self, interval_s: float = 0.1, pids: dict[int, str] | None = None):
        self.interval_s = interval_s
        self.roots = dict(pids or {})  # pid -> role ("server", "client")
        self.procs: dict[int, tuple[psutil.Process, str]] = {}
        self.threads: dict[
            int, dict[int, tuple[int, int, int]]
        ] = {}  # pid -> tid -> last schedstat
        self.schedstat = Path("/proc/self/schedstat").exists()
        self.gaps_ms: list[float] = []  # between polls: the interval really achieved
        self._last_poll = 0
        self._next_refresh = 0
        self.gone: list[int] = []

    def open(self) -> dict[str, Any]:
        missing = [pid for pid in self.roots if not psutil.pid_exists(pid)]
        for pid in missing:
            del self.roots[pid]  # system CPU alone is still worth recording
        return {
            "cpus": psutil.cpu_count(),
            "roots": {str(p): r for p, r in self.roots.items()},
            "missing": missing,
            "thread_cpu": "schedstat ns"
            if self.schedstat
            else f"ticks of {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms",
        }

    def _refresh(self) -> list[Sample]:
        """Add new descendants of the root processes; describe each process once."""
        out = []
        for root, role in self.roots.items():
            try:
                family = [psutil.Process(root)]
                family += family[0].children(recursive=True)
            except psutil.Error:
                continue
            for p in family:
                if (
                    p.pid in self.procs or p.pid == os.getpid()
                ):  # not the poller itself: see its cost
                    continue
                try:
                    info = {"name": p.name(), "ppid": p.ppid(), "cmdline": redact(p.cmdline())}
                except psutil.Error:
                    continue
                self.procs[p.pid] = (p, role)
                out.append(
                    ProcInfo(t_ns=time.monotonic_ns(), src="host", pid=p.pid, role=role, **info)
                )
        return out

    def poll(self) -> list[Sample]:
        now = time.monotonic_ns()
        if self._last_poll:
            self.gaps_ms.append((now - self._last_poll) / 1e6)
        self._last_poll = now
        out: list[Sample] = []
        if now >= self._next_refresh:
            out += self._refresh()
            self._next_refresh = now + REFRESH_NS
        for pid, (p, role) in list(self.procs.items()):
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    ctx = p.num_ctx_switches()
                threads, names = self._threads(pid, p)
            except psutil.Error:
                del self.procs[pid]
                self.gone.append(pid)
                continue
            t = time.monotonic_ns()
            out.append(
                Proc(
                    t_ns=t,
                    src="host",
                    pid=pid,
                    role=role,
                    cpu_s=cpu.user + cpu.system,
                    user_s=cpu.user,
                    sys_s=cpu.system,
                    ctx_vol=ctx.voluntary,
                    ctx_invol=ctx.involuntary,
                    threads=threads,
                )
            )
            if names:
                out.append(ThreadNames(t_ns=t, src="host", pid=pid, names=names))
        cpu = psutil.cpu_times()
        total = sum(cpu) - getattr(cpu, "guest", 0.0) - getattr(cpu, "guest_nice", 0.0)
        idle = cpu.idle + getattr(cpu, "iowait", 0.0)
        out.append(
            System(
                t_ns=time.monotonic_ns(),
                src="host",
                busy_s=total - idle,
                total_s=total,
                ctx=psutil.cpu_stats().ctx_switches,
                cpus=psutil.cpu_count(),
            )
        )
        return out

    def _threads(
        self, pid: int, p: psutil.Process
    ) -> tuple[dict[str, list[int | None]], dict[str, str]]:
        """Threads whose CPU moved since the last poll: tid -> [run_ns, wait_ns, slices]; new
        names."""
        last = self.threads.setdefault(pid, {})
        changed: dict[str, list[int | None]] = {}
        names: dict[str, str] = {}
        if self.schedstat:
            current = {}
            for tid in map(int, os.listdir(f"/proc/{pid}/task")):
                stat = _read_schedstat(f"/proc/{pid}/task/{tid}/schedstat")
                if stat is not None:
                    current[tid] = stat
        else:
            current = {t.id: (int((t.user_time + t.system_time) * 1e9), 0, 0) for t in p.threads()}
        for tid, stat in current.items():
            if tid not in last:
                names[str(tid)] = _comm(pid, tid)
            if last.get(tid) != stat:
                changed[str(tid)] = list(stat) if self.schedstat else [stat[0], None, None]
        self.threads[pid] = current
        return changed, names

    def close(self) -> dict[str, Any]:
        gaps = self.gaps_ms
        return {
            "interval_ms": self.interval_s * 1e3,
            "poll_gap_ms_p50": percentile(gaps, 50) if gaps else None,
            "poll_gap_ms_max": max(gaps, default=None),
            "process_cpu_quantum_ms": 1000 / os.sysconf("SC_CLK_TCK"),
            "thread_cpu": "schedstat ns" if self.schedstat else "ticks",
            "processes": len(self.procs) + len(self.gone),
            "exited": self.gone,
        }
