"""Choosing the backends, and running them beside a `cputax run` in a child process.

The pollers run in their own process (`python -m cputax.telemetry`) so their Python
work never holds the client's GIL: telemetry must not move the client timestamps it
is later aligned with. The child writes samples to DIR/telemetry.jsonl as they come
(flushed per line), reports what it opened as one JSON line on stdout, stops when its
stdin closes (also when the parent dies), and then prints its metadata: devices,
measured resolutions, what polling cost.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cputax.records import JsonlWriter
from cputax.rundir import RunDir
from cputax.telemetry.base import (
    SOURCES,
    Clock,
    Poller,
    TelemetryUnavailable,
    load_all,
    run_pollers,
)

READY_TIMEOUT_S = 30.0
EMULATED = "emulated"  # the emulated GPU's source (telemetry.emulated)
STOP_TIMEOUT_S = 15.0


@dataclass
class TelemetryConfig:
    gpu: str = "auto"  # auto | amd | nvidia | none
    gpu_interval_ms: float = 20.0  # utilization / activity; GPM is never windowed below 100 ms
    slow_interval_ms: float = 500.0  # power, clocks, memory, per-process GPU use
    host_interval_ms: float = 100.0  # per process and per thread CPU


def gpu_poller(
    kind: str, config: TelemetryConfig, modules: dict[str, Any] | None = None
) -> tuple[Poller | None, dict[str, Any], list[str]]:
    """The GPU backend asked for, opened (with what it found), or None with one line per
    reason it is absent.

    `auto` tries NVIDIA, then AMD. `modules` replaces the real libraries (tests).
    """
    from cputax.telemetry.amd import AmdPoller
    from cputax.telemetry.nvidia import NvidiaPoller

    modules = modules or {}
    interval, slow = config.gpu_interval_ms / 1e3, config.slow_interval_ms / 1e3
    makers = {
        "nvidia": lambda: NvidiaPoller(interval, slow, nvml=modules.get("nvidia")),
        "amd": lambda: AmdPoller(interval, slow, amdsmi=modules.get("amd")),
    }
    if kind == "none":
        return None, {}, []
    failures: list[TelemetryUnavailable] = []
    for name in ("nvidia", "amd") if kind == "auto" else (kind,):
        poller = makers[name]()
        try:
            return poller, poller.open(), []
        except TelemetryUnavailable as exc:
            failures.append(exc)
    if kind == "auto":
        return (
            None,
            {},
            [
                "GPU telemetry off (auto): "
                + "; ".join(f.reason for f in failures)
                + ". On a GPU host: pip install 'cputax[nvidia]' or 'cputax[amd]'"
            ],
        )
    return None, {}, [f"GPU telemetry off: {failures[0]}"]


def open_pollers(
    config: TelemetryConfig, pids: dict[int, str], sources: dict[str, Any] | None = None
) -> tuple[list[Poller], dict[str, Any], list[str]]:
    """Host telemetry (of the processes `pids`: root pid -> role) always; the GPU backend
    when one answers; the SOURCES that `sources` asks for."""
    from cputax.telemetry.host import HostPoller

    host = HostPoller(config.host_interval_ms / 1e3, pids)
    opened = {"host": host.open()}
    pollers: list[Poller] = [host]
    gpu, info, notes = gpu_poller(config.gpu, config)
    if gpu is not None:
        pollers.append(gpu)
        opened[gpu.name] = info
    load_all()  # every module of the package registers its sources
    for name, make in SOURCES.items():
        poller = make(sources or {})
        if poller is None:
            continue
        try:
            opened[name] = poller.open()
        except TelemetryUnavailable as exc:
            notes.append(f"{name} telemetry off: {exc}")
            continue
        pollers.append(poller)
    return pollers, opened, notes


def clock_sample() -> Clock:
    """The first line of a telemetry file: the monotonic clock against wall time."""
    return Clock(t_ns=time.monotonic_ns(), src="cputax", time_ns=time.time_ns())


def child_main(argv: list[str]) -> int:
    """`python -m cputax.telemetry '{"config": {...}, "pids": {PID: ROLE}}' OUT_FILE`."""
    args = json.loads(argv[0])
    protocol = sys.stdout
    sys.stdout = sys.stderr  # a library that prints must not break the protocol on stdout
    pollers, opened, notes = open_pollers(
        TelemetryConfig(**args["config"]),
        {int(k): v for k, v in args["pids"].items()},
        args.get("sources"),
    )
    print(json.dumps({"ready": True, "opened": opened, "notes": notes}), file=protocol, flush=True)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    with JsonlWriter(Path(argv[1])) as writer:
        writer.write(clock_sample())
        stats = run_pollers(pollers, writer.write, stop)
        for p in pollers:  # a source that learns its last values only at the end (emulated)
            for sample in getattr(p, "drain", list)():
                writer.write(sample)
    meta = {
        p.name: {**opened.get(p.name, {}), **p.close(), "cost": stats[p.name].summary()}
        for p in pollers
    }
    try:
        print(json.dumps({"meta": meta, "notes": notes}), file=protocol, flush=True)
    except BrokenPipeError:  # the run went away first (killed): its files are written, end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), protocol.fileno())  # no second error at exit
    return 0


class TelemetryMonitor:
    """The run's monitor (session.Monitor): starts the child, stops it, keeps its metadata."""

    name = "telemetry"

    def __init__(self, config: TelemetryConfig, own_role: str = "client"):
        self.config = config
        self.own_role = (
            own_role  # what this process is in the tables: the load's client, or a node agent
        )
        self.proc: subprocess.Popen[str] | None = None
        self.ready: dict[str, Any] = {}
        self.console = Console(stderr=True)

    def start(self, run: RunDir, target: dict[str, Any]) -> None:
        from cputax.targets.processes import server_pids

        pids = {pid: "server" for pid in server_pids(target)}
        pids.setdefault(os.getpid(), self.own_role)
        args = {
            "config": asdict(self.config),
            "pids": {str(k): v for k, v in pids.items()},
            "sources": (
                {"emulated_gpu": str(run.emulated_gpu)} if target.get("emulated_gpu") else {}
            ),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cputax.telemetry", json.dumps(args), str(run.telemetry)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.ready = self._read_line("ready", READY_TIMEOUT_S) or {}
        if not self.ready:
            self.console.print(f"[yellow]telemetry did not start within {READY_TIMEOUT_S:.0f} s[/]")
        for note in self.ready.get("notes", []):
            self.console.print(note, style="yellow", markup=False)
        if "server" not in pids.values():
            self.console.print(
                "host telemetry: the server's processes are unknown (remote endpoint); "
                "only the client and the system CPU are recorded",
                style="yellow",
            )
        opened = self.ready.get("opened", {})
        gpus = [
            d["name"]
            for key in ("nvidia", "amd", EMULATED)
            for d in opened.get(key, {}).get("devices", [])
        ]
        if gpus:
            self.console.print(f"GPU telemetry: {', '.join(gpus)}")

    def _read_line(self, key: str, timeout_s: float) -> dict[str, Any] | None:
        """The child's next protocol line holding `key`; other output is skipped."""
        assert self.proc is not None and self.proc.stdout is not None
        result: list[dict[str, Any]] = []

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("{"):
                    obj = json.loads(line)
                    if key in obj:
                        result.append(obj)
                        return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        return result[0] if result else None

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        pass  # windows.jsonl has the scenario boundaries; the pollers run throughout

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        final = self._read_line("meta", STOP_TIMEOUT_S)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        if final is None:
            return {
                "error": "the telemetry process did not report back",
                "notes": self.ready.get("notes", []),
            }
        return {**final["meta"], "notes": final["notes"], "config": asdict(self.config)}
