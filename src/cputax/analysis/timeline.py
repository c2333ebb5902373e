"""Time series on one clock: intervals, bins, and the series telemetry.jsonl holds.

Everything is an Interval (t0_ns, t1_ns, value) on time.monotonic_ns(): a GPU busy %
over a window, or a counter's increase over one (CPU ns of a thread between two polls).
A Grid cuts a window into bins and puts intervals into them, so every source is
compared on the same bins, and the bin width is the coarsest source's resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

from cputax.telemetry.base import BusySeries, Sample, busy_kinds, decode, kind_of


@dataclass(frozen=True)
class Interval:
    t0_ns: int
    t1_ns: int
    value: float


@dataclass(frozen=True)
class Grid:
    """Bins of `width_ns` from `start_ns`; the last one is cut at `end_ns`."""

    start_ns: int
    end_ns: int
    width_ns: int

    @property
    def n(self) -> int:
        return max(1, -(-(self.end_ns - self.start_ns) // self.width_ns))

    def bounds(self, i: int) -> tuple[int, int]:
        lo = self.start_ns + i * self.width_ns
        return lo, min(lo + self.width_ns, self.end_ns)

    def overlaps(self, t0: int, t1: int) -> Iterator[tuple[int, int, int]]:
        """(bin, lo, hi) for each bin that [t0, t1) overlaps, clipped to the bin."""
        a, b = max(t0, self.start_ns), min(t1, self.end_ns)
        if b <= a:
            return
        for i in range(
            (a - self.start_ns) // self.width_ns, (b - 1 - self.start_ns) // self.width_ns + 1
        ):
            lo, hi = self.bounds(i)
            yield i, max(a, lo), min(b, hi)

    def averages(self, intervals: Iterable[Interval]) -> list[float | None]:
        """Time-weighted mean of a level (busy %) per bin; None where nothing covers the bin."""
        weighted, covered = [0.0] * self.n, [0] * self.n
        for iv in intervals:
            for i, lo, hi in self.overlaps(iv.t0_ns, iv.t1_ns):
                weighted[i] += iv.value * (hi - lo)
                covered[i] += hi - lo
        return [w / c if c else None for w, c in zip(weighted, covered, strict=True)]

    def sums(self, intervals: Iterable[Interval]) -> list[float]:
        """A counter's increase per bin, each interval's increase spread evenly over it."""
        out = [0.0] * self.n
        for iv in intervals:
            length = iv.t1_ns - iv.t0_ns
            if length <= 0:
                continue
            for i, lo, hi in self.overlaps(iv.t0_ns, iv.t1_ns):
                out[i] += iv.value * (hi - lo) / length
        return out

    def occupancy_of(self, t0: np.ndarray, t1: np.ndarray) -> list[float]:
        """`occupancy` of one label's spans given as columns, without a loop over them:
        per bin edge x, the open time so far is sum(clip(x - t0, 0, t1 - t0)), from sorted
        starts and ends and their running sums; a bin's mean is the difference over its width."""
        edges = (
            np.array([self.bounds(i)[0] for i in range(self.n)] + [self.end_ns], dtype=np.float64)
            - self.start_ns
        )
        a, b = np.sort(t0 - self.start_ns), np.sort(t1 - self.start_ns)
        sums_a, sums_b = (
            np.concatenate([[0.0], np.cumsum(a)]),
            np.concatenate([[0.0], np.cumsum(b)]),
        )
        ia, ib = np.searchsorted(a, edges), np.searchsorted(b, edges)
        opened = (ia * edges - sums_a[ia]) - (ib * edges - sums_b[ib])
        return (np.diff(opened) / np.diff(edges)).tolist()

    def occupancy(self, spans: Iterable[tuple[int, int, str]]) -> dict[str, list[float]]:
        """Mean number of labelled spans open per bin (requests in flight, threads in a
        category)."""
        out: dict[str, list[float]] = {}
        for t0, t1, label in spans:
            row = out.setdefault(label, [0.0] * self.n)
            for i, lo, hi in self.overlaps(t0, t1):
                row[i] += (hi - lo) / (self.bounds(i)[1] - self.bounds(i)[0])
        return out


def read_telemetry(samples: Iterable[dict[str, Any] | Sample]) -> dict[str, list[Any]]:
    """telemetry.jsonl records (or samples as a poller returns them) as typed samples by
    kind, each list in time order; lines of a kind this cputax does not know are left out."""
    by_kind: dict[str, list[Any]] = {}
    for raw in samples:
        s = raw if isinstance(raw, Sample) else decode(raw)
        if s is not None:
            by_kind.setdefault(kind_of(s), []).append(s)
    for rows in by_kind.values():
        rows.sort(key=lambda s: s.t_ns)
    return by_kind


# -- GPU ---------------------------------------------------------------------------


# Sources of "GPU busy" (% of time any kernel / the GFX engine was active), best first:
# every sample kind that declares a BusySeries (telemetry.base), e.g. the emulated GPU's
# exact steps, NVML GPM, the driver's samples, utilization rates, amdsmi's accumulators.
def busy_sources() -> dict[str, BusySeries]:
    """Kind -> how it measures GPU busy, best first (the registry as it is now)."""
    return {kind_of(k): k.busy_series for k in busy_kinds()}  # type: ignore[misc]


def source_names() -> dict[str, str]:
    """Kind -> the name reports give the source, best first."""
    return {kind: series.label for kind, series in busy_sources().items()}


STEP_CAP_NS = 1_500_000_000  # a value written on change holds at most this long


@dataclass
class GpuBusy:
    """Busy % intervals per device and source, and how fine each source really is."""

    intervals: dict[tuple[int, str], list[Interval]] = field(default_factory=dict)
    resolution_ms: dict[tuple[int, str], float] = field(default_factory=dict)
    basis: dict[tuple[int, str], str] = field(
        default_factory=dict
    )  # how each resolution was established
    alignment_ms: float = 0.0
    backend: str = ""

    @property
    def devices(self) -> list[int]:
        return sorted({dev for dev, _ in self.intervals})


def _source_intervals(series: BusySeries, rows: list[Any]) -> dict[int, list[Interval]]:
    by_dev: dict[int, list[Any]] = {}
    for r in rows:
        if getattr(r, series.field) is not None:
            by_dev.setdefault(r.dev, []).append(r)
    out: dict[int, list[Interval]] = {}
    for dev, rs in by_dev.items():
        values = [getattr(r, series.field) for r in rs]
        if series.covers == "window":  # explicit windows (GPM, accumulators, emulated steps)
            out[dev] = [Interval(r.t0_ns, r.t_ns, v) for r, v in zip(rs, values, strict=True)]
            continue
        # a driver sample covers the time since the previous one; a value written on change
        # (rates, firmware averages) holds until the next, within STEP_CAP_NS
        gaps = sorted(b.t_ns - a.t_ns for a, b in pairwise(rs)) or [100_000_000]
        period = gaps[len(gaps) // 2]
        if series.covers == "since_previous":  # a gap over two periods: nothing recorded, unknown
            starts = [rs[0].t_ns - period] + [r.t_ns for r in rs[:-1]]
            out[dev] = [
                Interval(max(s, r.t_ns - 2 * period), r.t_ns, v)
                for s, r, v in zip(starts, rs, values, strict=True)
            ]
        else:
            ends = [r.t_ns for r in rs[1:]] + [rs[-1].t_ns + period]
            out[dev] = [
                Interval(r.t_ns, min(end, r.t_ns + STEP_CAP_NS), v)
                for r, end, v in zip(rs, ends, values, strict=True)
            ]
    return out


def gpu_busy(by_kind: dict[str, list[Any]], meta: dict[str, Any]) -> GpuBusy | None:
    """The GPU busy series telemetry.jsonl holds, with resolutions from the run's metadata.
    A source that is `exclusive` (the emulated GPU's steps) is the run's only one when it
    has any samples."""
    sources = busy_sources()
    exclusive = [k for k, series in sources.items() if series.exclusive and by_kind.get(k)]
    kinds = exclusive[:1] or [k for k, series in sources.items() if not series.exclusive]
    backends = {rows[0].src for k in kinds if (rows := by_kind.get(k))}
    backend = next((b for b in meta if b in backends), "") or min(backends, default="")
    series_meta = meta.get(backend, {}).get("series", {})
    busy = GpuBusy(alignment_ms=meta.get(backend, {}).get("alignment_ms") or 0.0, backend=backend)
    for kind in kinds:
        for dev, intervals in _source_intervals(sources[kind], by_kind.get(kind, [])).items():
            busy.intervals[(dev, kind)] = intervals
            described = series_meta.get(str(dev), {}).get(sources[kind].series, {})
            res, basis = described.get("resolution_ms"), described.get("basis", "")
            if res is None:  # no metadata (a crashed run): the median window length
                lengths = sorted(iv.t1_ns - iv.t0_ns for iv in intervals)
                res, basis = lengths[len(lengths) // 2] / 1e6, "median sample window (no metadata)"
            busy.resolution_ms[(dev, kind)] = res
            busy.basis[(dev, kind)] = basis
    return busy if busy.intervals else None


# -- host --------------------------------------------------------------------------


@dataclass
class HostSeries:
    """Per process and per thread CPU as intervals of increase (ns on CPU, ns waiting for one)."""

    roles: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # pid -> process name
    cmdlines: dict[int, list[str]] = field(default_factory=dict)
    thread_names: dict[tuple[int, int], str] = field(default_factory=dict)
    cpu: dict[int, list[Interval]] = field(default_factory=dict)  # pid -> run ns per poll interval
    wait: dict[int, list[Interval]] = field(default_factory=dict)  # pid -> run-queue wait ns
    switches: dict[int, list[Interval]] = field(default_factory=dict)  # pid -> times scheduled in
    thread_cpu: dict[tuple[int, int], list[Interval]] = field(default_factory=dict)
    thread_wait: dict[tuple[int, int], list[Interval]] = field(
        default_factory=dict
    )  # run-queue wait ns
    system: list[Interval] = field(default_factory=list)  # busy fraction of all CPUs
    cpus: int = 0


def host_series(by_kind: dict[str, list[Any]]) -> HostSeries | None:
    """Turn cumulative per-poll counters into per-interval increases. A process's first
    sample is only a baseline; a thread first seen later counts all its CPU (it started
    since the previous poll)."""
    if not by_kind.get("proc") and not by_kind.get("system"):
        return None
    host = HostSeries()
    for r in by_kind.get("proc_info", []):
        host.roles[r.pid] = r.role
        host.names[r.pid] = r.name
        host.cmdlines[r.pid] = r.cmdline
    for r in by_kind.get("thread_names", []):
        for tid, name in r.names.items():
            host.thread_names[(r.pid, int(tid))] = name
    last: dict[int, Any] = {}
    threads: dict[int, dict[int, list[int | None]]] = {}
    for r in by_kind.get("proc", []):
        pid = r.pid
        host.roles.setdefault(pid, r.role)
        known = threads.setdefault(pid, {})
        prev = last.get(pid)
        if prev is not None:
            t0, t1 = prev.t_ns, r.t_ns
            run = wait = slices = 0
            for tid_s, (run_ns, wait_ns, n) in r.threads.items():
                old = known.get(int(tid_s), [0, 0, 0])
                d_run = run_ns - (old[0] or 0)
                d_wait = (wait_ns or 0) - (old[1] or 0)
                run += d_run
                wait += d_wait
                slices += (n or 0) - (old[2] or 0)
                host.thread_cpu.setdefault((pid, int(tid_s)), []).append(Interval(t0, t1, d_run))
                host.thread_wait.setdefault((pid, int(tid_s)), []).append(Interval(t0, t1, d_wait))
            if not r.threads and not known:  # no per-thread data: process cpu_times (10 ms ticks)
                run = int((r.cpu_s - prev.cpu_s) * 1e9)
            host.cpu.setdefault(pid, []).append(Interval(t0, t1, run))
            host.wait.setdefault(pid, []).append(Interval(t0, t1, wait))
            host.switches.setdefault(pid, []).append(Interval(t0, t1, slices))
        for tid_s, stat in r.threads.items():
            known[int(tid_s)] = stat
        last[pid] = r
    for a, b in pairwise(by_kind.get("system", [])):
        total = b.total_s - a.total_s
        busy = (b.busy_s - a.busy_s) / total if total > 0 else 0.0
        host.system.append(Interval(a.t_ns, b.t_ns, busy))
        host.cpus = b.cpus if b.cpus is not None else host.cpus
    return host
