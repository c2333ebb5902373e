"""One poller interface for GPU and host telemetry, the loop that runs pollers, and the
measure of how fine a source really is.

A poller returns samples as plain dicts, each with `t_ns` (time.monotonic_ns(), the
run's clock), `src` (backend name) and `kind`. Values a source cannot give are left
out, never written as zero. Every poller also watches how often its values really
change (ChangeTracker): a counter read 1000 times a second that moves every 100 ms
has a 100 ms resolution, and analysis must not claim finer structure than that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

from cputax.util import percentile

Sample = dict[str, Any]
MIN_CHANGES = 5  # fewer value changes than this: the resolution was not measured


class TelemetryUnavailable(Exception):
    """A backend cannot run on this host: one line, the reason and what to install."""

    def __init__(self, reason: str, fix: str = ""):
        super().__init__(f"{reason}: {fix}" if fix else reason)
        self.reason = reason


class Poller(Protocol):
    name: str
    interval_s: float

    def open(self) -> dict[str, Any]:
        """Find the devices or processes; raise TelemetryUnavailable. Returns what was found."""

    def poll(self) -> list[Sample]:
        """Read once; never raises for one metric that fails (it is dropped and noted)."""

    def close(self) -> dict[str, Any]:
        """Release the library; return metadata, including the measured resolution."""


class ChangeTracker:
    """When does each series' value really change? The gaps between changes bound the
    source's refresh period from above, so their 10th percentile is its resolution."""

    def __init__(self) -> None:
        self._last: dict[str, Any] = {}
        self._changes: dict[str, list[int]] = {}
        self._reads: dict[str, int] = {}

    def observe(self, key: str, t_ns: int, value: Any) -> None:
        self._reads[key] = self._reads.get(key, 0) + 1
        if key in self._last and self._last[key] != value:
            self._changes.setdefault(key, []).append(t_ns)
        self._last[key] = value

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for key, reads in self._reads.items():
            times = self._changes.get(key, [])
            gaps = [(b - a) / 1e6 for a, b in pairwise(times)]
            out[key] = {"reads": reads, "changes": len(times),
                        "change_gap_ms_p10": percentile(gaps, 10) if gaps else None,
                        "change_gap_ms_p50": percentile(gaps, 50) if gaps else None}
        return out

    def resolution_ms(self, key: str, floor_ms: float) -> tuple[float, str]:
        """The series' resolution, never finer than `floor_ms` (poll or sample period, or a
        documented floor), and how it was established."""
        stats = self.summary().get(key)
        if not stats or stats["changes"] < MIN_CHANGES:
            changes = stats["changes"] if stats else 0
            return floor_ms, f"not measured ({changes} value changes); using the {floor_ms:.0f} ms floor"
        measured = stats["change_gap_ms_p10"]
        return max(measured, floor_ms), f"measured: {stats['changes']} value changes, p10 gap {measured:.0f} ms"


@dataclass
class Guard:
    """Reads one metric; the first failure drops it for the rest of the run and notes why,
    so a metric a GPU does not support costs one exception, not one per poll."""

    dropped: dict[str, str]

    def read(self, name: str, fn: Callable[[], Any]) -> Any:
        if name in self.dropped:
            return None
        try:
            return fn()
        except Exception as exc:  # the libraries raise their own types; all mean "not here"
            self.dropped[name] = f"{type(exc).__name__}: {exc}"[:200]
            return None


class PollStats:
    """What polling cost: the telemetry must not become the CPU tax it measures."""

    def __init__(self) -> None:
        self.durations_ms: list[float] = []
        self.late = 0
        self.error: str | None = None  # why the poller was stopped, if it was

    def summary(self) -> dict[str, Any]:
        d = self.durations_ms
        return {"polls": len(d), "late": self.late, "error": self.error,
                "poll_ms_p50": percentile(d, 50) if d else None, "poll_ms_max": max(d) if d else None}


def run_pollers(pollers: list[Poller], sink: Callable[[Sample], None], stop: threading.Event) -> dict[str, PollStats]:
    """Poll each poller at its own interval on absolute deadlines until `stop` is set.

    One thread for all of them: a poll that overruns delays the next (counted as late)
    instead of piling up threads. A poller that raises is stopped and the error kept;
    the others go on (a GPU library surprise must not end the host telemetry).
    """
    stats = {p.name: PollStats() for p in pollers}
    due = {p.name: time.monotonic_ns() for p in pollers}
    active = list(pollers)
    while active and not stop.is_set():
        for p in list(active):
            now = time.monotonic_ns()
            if due[p.name] > now:
                continue
            try:
                samples = p.poll()
            except Exception as exc:
                stats[p.name].error = f"{type(exc).__name__}: {exc}"[:300]
                active.remove(p)
                del due[p.name]
                continue
            for sample in samples:
                sink(sample)
            done = time.monotonic_ns()
            stats[p.name].durations_ms.append((done - now) / 1e6)
            step = int(p.interval_s * 1e9)
            due[p.name] += step
            if due[p.name] <= done:  # fell behind: skip the missed deadlines
                stats[p.name].late += 1
                due[p.name] = done + step
        if due:
            stop.wait(max(0.0, (min(due.values()) - time.monotonic_ns()) / 1e9))
    return stats
