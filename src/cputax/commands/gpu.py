"""`cputax gpu`: a standalone monitor in the spirit of `nvidia-smi dmon` / `amd-smi monitor`,
faster and with the driver's own timestamps: JSONL out, a live table on a terminal."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from cputax.errors import CputaxError
from cputax.records import JsonlWriter
from cputax.telemetry.base import Poller, Sample, kind_of, run_pollers
from cputax.telemetry.host import HostPoller, Proc, System
from cputax.telemetry.runner import TelemetryConfig, clock_sample, gpu_poller

SHOWN = {
    "util": ("gpu",),
    "rates": ("gpu", "mem"),
    "gpm": ("gr_util", "sm_util", "sm_occupancy", "tensor_util"),
    "activity": ("gfx", "umc", "xcp_gfx"),
    "activity_avg": ("gfx", "umc"),
    "power": ("power_w", "sm_mhz", "gfx_mhz", "mem_used_mb", "vram_used_mb"),
    "proc_util": ("pid", "sm", "mem"),
}


class LiveView:
    """The latest value of each series, and host CPU as rates between the last two polls."""

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str, Any], Sample] = {}
        self.previous: dict[tuple[str, str, Any], Sample] = {}
        self.lock = threading.Lock()

    def update(self, s: Sample) -> None:
        key = (s.src, kind_of(s), getattr(s, "dev", getattr(s, "pid", None)))
        with self.lock:
            if key in self.latest:
                self.previous[key] = self.latest[key]
            self.latest[key] = s

    def _cells(self, key: tuple[str, str, Any], s: Sample) -> str:
        prev = self.previous.get(key)
        if isinstance(s, System) and isinstance(prev, System):
            total = s.total_s - prev.total_s
            cpus = f" of {s.cpus} CPUs" if s.cpus else ""
            return f"busy {100 * (s.busy_s - prev.busy_s) / total:.0f}%{cpus}" if total else ""
        if isinstance(s, Proc) and isinstance(prev, Proc):
            dt = (s.t_ns - prev.t_ns) / 1e9
            return f"{100 * (s.cpu_s - prev.cpu_s) / dt:.0f}% of a core" if dt else ""
        shown = ((k, getattr(s, k, None)) for k in SHOWN.get(kind_of(s), ()))
        return "  ".join(f"{k} {_fmt(v)}" for k, v in shown if v is not None)

    def table(self) -> Table:
        table = Table(title=f"cputax gpu  {time.strftime('%H:%M:%S')}  (Ctrl-C stops)")
        for col in ("source", "kind", "device / pid", "latest"):
            table.add_column(col)
        with self.lock:
            for key in sorted(self.latest, key=str):
                if cells := self._cells(key, self.latest[key]):
                    table.add_row(key[0], key[1], str(key[2] if key[2] is not None else ""), cells)
        return table


def _fmt(v: Any) -> str:
    if isinstance(v, list):
        return "[" + " ".join(_fmt(x) for x in v) + "]"
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def _pollers(backend: str, interval_ms: float, pid: int | None) -> list[Poller]:
    host = HostPoller(max(interval_ms, 100.0) / 1e3, {pid: "watched"} if pid else {})
    host.open()
    if backend == "host":
        return [host]
    gpu, _, notes = gpu_poller(backend, TelemetryConfig(gpu=backend, gpu_interval_ms=interval_ms))
    if gpu is None:
        raise CputaxError(notes[0])
    return [gpu, host] if pid else [gpu]


def gpu_monitor(
    backend: str = "auto",
    interval_ms: float = 20.0,
    output: Path | None = None,
    duration_s: float | None = None,
    pid: int | None = None,
) -> int:
    pollers = _pollers(backend, interval_ms, pid)
    console = Console(stderr=True)
    live = Console().is_terminal
    writer = JsonlWriter(output) if output else None
    view = LiveView()
    stop = threading.Event()

    def to_stdout(s: Sample) -> None:
        try:
            sys.stdout.buffer.write(s.to_json() + b"\n")
            sys.stdout.buffer.flush()
        except BrokenPipeError:  # `| head`: the reader has gone
            stop.set()

    sinks: list[Callable[[Sample], None]] = [view.update] if live else []
    if writer:
        sinks.append(writer.write)
    elif not live:
        sinks.append(to_stdout)  # piped: JSONL on stdout

    def sink(s: Sample) -> None:
        for fn in sinks:
            fn(s)

    sink(clock_sample())
    stats: dict[str, Any] = {}
    thread = threading.Thread(
        target=lambda: stats.update(run_pollers(pollers, sink, stop)), daemon=True
    )
    thread.start()
    end = time.monotonic() + duration_s if duration_s else float("inf")
    try:
        if live:
            with Live(view.table(), console=Console(), refresh_per_second=4) as screen:
                while time.monotonic() < end:
                    time.sleep(0.25)
                    screen.update(view.table())
        else:
            while time.monotonic() < end:
                time.sleep(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        thread.join()
        if writer:
            writer.close()
    for p in pollers:
        info = p.close()
        for dev, series in info.get("series", {}).items():
            for name, res in series.items():
                console.print(
                    f"{p.name} {dev} {name}: resolution {res['resolution_ms']:.0f} ms "
                    f"({res['basis']})"
                )
        if stats.get(p.name):
            cost = stats[p.name].summary()
            console.print(
                f"{p.name}: {cost['polls']} polls, {cost['poll_ms_p50'] or 0:.2f} ms each (p50), "
                f"{cost['late']} late"
            )
    return 0
