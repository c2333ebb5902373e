"""One poller interface for GPU and host telemetry, the loop that runs pollers, and the
measure of how fine a source really is.

A poller returns typed samples: each kind of sample is a `Sample` Struct that its
poller's module declares and registers (`@sample_kind`), with `t_ns` (time.monotonic_ns(),
the run's clock), `src` (backend name) and the `kind` tag. Values a source cannot give are
None and left out of the file, never written as zero. A kind that measures GPU busy says so
(`busy`, a BusySeries), so analysis learns a new source from its module alone; a source
that is not host or GPU telemetry registers how it is made (`register_source`). Adding a
source is one module in this package. Every poller also watches how often its values really
change (ChangeTracker): a counter read 1000 times a second that moves every 100 ms
has a 100 ms resolution, and analysis must not claim finer structure than that.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import msgspec

from cputax.util import percentile

__all__ = [
    "KINDS",
    "SOURCES",
    "BusySeries",
    "ChangeTracker",
    "Clock",
    "Guard",
    "Poller",
    "PollStats",
    "Power",
    "Sample",
    "TelemetryUnavailable",
    "busy_kinds",
    "decode",
    "kind_of",
    "load_all",
    "register_source",
    "run_pollers",
    "sample_kind",
]

MIN_CHANGES = 5  # fewer value changes than this: the resolution was not measured


@dataclass(frozen=True)
class BusySeries:
    """How a sample kind measures GPU busy, for analysis.timeline: the field holding busy %,
    the source's name in reports, the metadata series (per device) that gives its
    resolution, its rank (lower is better: a run uses its best sources), and what time a
    value covers: "window" (explicit t0_ns to t_ns), "since_previous" (a driver sample
    covers the time since the one before) or "held" (written on change, holds until the
    next)."""

    field: str
    label: str
    series: str
    rank: int
    covers: str = "window"
    exclusive: bool = False  # a run that has it uses only it (the emulated GPU's own steps)


class Sample(msgspec.Struct, tag_field="kind", kw_only=True, omit_defaults=True):
    """One telemetry reading; subclasses are the kinds (`@sample_kind`)."""

    t_ns: int
    src: str = ""  # the backend; always written by cputax's pollers
    busy_series: ClassVar[BusySeries | None] = None  # set by kinds that measure GPU busy

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)


KINDS: dict[str, type[Sample]] = {}  # kind tag -> its Struct, filled by @sample_kind
S = TypeVar("S", bound=type[Sample])


def sample_kind(cls: S) -> S:
    """Register a Sample subclass under its tag (the `kind` written to telemetry.jsonl)."""
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str) or KINDS.get(tag, cls) is not cls:
        raise ValueError(f"{cls.__name__}: a sample kind needs a tag of its own (got {tag!r})")
    KINDS[tag] = cls
    return cls


@sample_kind
class Clock(Sample, tag="clock"):
    """The first line of a telemetry file: the monotonic clock against wall time."""

    time_ns: int


@sample_kind
class Power(Sample, tag="power"):
    """Power, clocks and memory of one GPU (NVIDIA and AMD name some fields differently)."""

    dev: int
    power_w: float | None = None
    sm_mhz: float | None = None
    gfx_mhz: float | None = None
    mem_mhz: float | None = None
    mem_used_mb: float | None = None
    mem_total_mb: float | None = None
    vram_used_mb: float | None = None
    vram_total_mb: float | None = None


def kind_of(sample: Sample | type[Sample]) -> str:
    """The kind a sample (or a sample class) is written as: its tag."""
    return str(sample.__struct_config__.tag)


RUNNERS = ("base", "runner")  # modules of this package that run sources but declare none


_loaded: list[bool] = []


def load_all() -> dict[str, type[Sample]]:
    """Import every source module of this package once (each registers its kinds and
    sources, whatever its name); the registered kinds."""
    if not _loaded:
        package = __name__.rpartition(".")[0]
        for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if not info.name.startswith("_") and info.name not in RUNNERS:
                importlib.import_module(f"{package}.{info.name}")
        _loaded.append(True)
    return KINDS


def busy_kinds() -> list[type[Sample]]:
    """The kinds that measure GPU busy, best first."""
    found = [k for k in load_all().values() if k.busy_series is not None]
    return sorted(found, key=lambda k: k.busy_series.rank)  # type: ignore[union-attr]


def decode(raw: dict[str, Any]) -> Sample | None:
    """A telemetry.jsonl line as its typed sample; None for a kind this cputax does not know
    (a newer one's) or a line that does not fit its kind."""
    kind = load_all().get(raw.get("kind", ""))
    if kind is None:
        return None
    try:
        return msgspec.convert(raw, kind)
    except msgspec.ValidationError:
        return None


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


# Sources beside host and GPU telemetry, by name: each made from the telemetry child's
# `sources` arguments (None: not asked for). A source's module registers itself.
MakeSource = Callable[[dict[str, Any]], "Poller | None"]
SOURCES: dict[str, MakeSource] = {}


def register_source(name: str) -> Callable[[MakeSource], MakeSource]:
    """Register how the source `name` is made (see SOURCES)."""

    def add(make: MakeSource) -> MakeSource:
        SOURCES[name] = make
        return make

    return add


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
            out[key] = {
                "reads": reads,
                "changes": len(times),
                "change_gap_ms_p10": percentile(gaps, 10) if gaps else None,
                "change_gap_ms_p50": percentile(gaps, 50) if gaps else None,
            }
        return out

    def resolution_ms(self, key: str, floor_ms: float) -> tuple[float, str]:
        """The series' resolution, never finer than `floor_ms` (poll or sample period, or a
        documented floor), and how it was established."""
        stats = self.summary().get(key)
        if not stats or stats["changes"] < MIN_CHANGES:
            changes = stats["changes"] if stats else 0
            return (
                floor_ms,
                f"not measured ({changes} value changes); using the {floor_ms:.0f} ms floor",
            )
        measured = stats["change_gap_ms_p10"]
        return max(
            measured, floor_ms
        ), f"measured: {stats['changes']} value changes, p10 gap {measured:.0f} ms"


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
        return {
            "polls": len(d),
            "late": self.late,
            "error": self.error,
            "poll_ms_p50": percentile(d, 50) if d else None,
            "poll_ms_max": max(d) if d else None,
        }


def run_pollers(
    pollers: list[Poller], sink: Callable[[Sample], None], stop: threading.Event
) -> dict[str, PollStats]:
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
