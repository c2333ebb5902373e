"""`cputax run --pyspy` and `cputax profile`: py-spy on every server process, one window
(scenario) at a time, written under DIR/pyspy/ as it goes.

Layout: pyspy/manifest.jsonl (one line per sampled process and window: pid, role, clock
stamps, py-spy's own report), and per window pyspy/<window>/<role>-<pid>.* : the
chrometrace (the timeline), collapsed stacks, a flamegraph SVG, a speedscope file, and
py-spy's log. Samplers start at each scenario's start and stop at its end, so files of
finished scenarios survive a crash and py-spy costs nothing between scenarios.

Overhead: with `workload.profiles.with_controls`, every scenario also runs once unsampled
(NAME-nopyspy) and is not sampled here; the report compares the pairs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cputax.errors import CputaxError
from cputax.records import JsonlWriter
from cputax.rundir import RunDir
from cputax.sampling.classify import classifier_for
from cputax.sampling.flamegraph import render_svg
from cputax.sampling.pyspy import (
    PyspyProcess,
    SamplerConfig,
    find_pyspy,
    meta,
    ptrace_problem,
    pyspy_version,
    stop_all,
)
from cputax.sampling.stacks import (
    collapse,
    read_chrometrace,
    thread_root,
    write_collapsed,
    write_speedscope,
)
from cputax.targets.processes import ServerProcess, find_server, server_pids
from cputax.workload.profiles import is_control

PROFILE_WINDOW = "profile"
SETTLE_S = 1.0


@dataclasses.dataclass
class Discovery:
    """How to find the server's processes: --target, --pid, --port."""

    server: str = "auto"
    pid: int | None = None
    port: int | None = None


@dataclasses.dataclass
class PyspyOptions:
    """What `cputax run --pyspy ...` asked for."""

    config: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    discovery: Discovery = dataclasses.field(default_factory=Discovery)
    overhead: bool = False  # also run every scenario unsampled (with_controls)


@dataclasses.dataclass
class _Sampled:
    process: ServerProcess
    stem: Path  # pyspy/<window>/<role>-<pid>, relative to the run directory
    main: PyspyProcess
    gil: PyspyProcess | None


class PyspyMonitor:
    """The Monitor (cputax.monitor) that samples the server during every scenario."""

    name = "pyspy"

    def __init__(
        self,
        config: SamplerConfig | None = None,
        discovery: Discovery | None = None,
        console: Console | None = None,
    ) -> None:
        self.config = config or SamplerConfig()
        self.discovery = discovery or Discovery()
        self.console = console or Console(stderr=True)
        self.problem: str | None = None
        self.server: str | None = None
        self.notes: list[str] = []
        self._run: RunDir | None = None
        self._target: dict[str, Any] = {}
        self._exe = ""
        self._version = ""
        self._window: str | None = None
        self._sampled: list[_Sampled] = []
        self._manifest: JsonlWriter | None = None

    # --- Monitor protocol ------------------------------------------------------------------
    def start(self, run: RunDir, target: dict[str, Any]) -> None:
        self._run, self._target = run, target
        try:
            self._exe = find_pyspy()
            self.server, procs = self._find()
        except CputaxError as exc:
            self._disable(str(exc))
            return
        if not procs:
            self._disable("found no Python process of the server to sample")
            return
        if problem := ptrace_problem([p.pid for p in procs]):
            self._disable(problem)
            return
        self._version = pyspy_version(self._exe)
        self._manifest = JsonlWriter(run.pyspy_manifest)
        roles = ", ".join(f"{p.role} {p.pid}" for p in procs)
        self.console.print(
            f"py-spy: sampling {self.server or 'unrecognised server'} ({roles}) "
            f"during every scenario, {self.config.describe()}"
        )

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        if self.problem or self._run is None or is_control(scenario):
            return
        if self._window is not None:
            self.scenario_end(self._window, t_ns)
        try:
            _, procs = self._find()
        except CputaxError as exc:
            self._note(f"{scenario}: not sampled: {exc}")
            return
        self._window = scenario
        for proc in procs:
            stem = self._run.pyspy_stem(scenario, proc.role, proc.pid)
            main = self._sampler(proc.pid, stem, "chrometrace.json", "log", "chrometrace", False)
            gil = (
                self._sampler(proc.pid, stem, "gil.txt", "gil.log", "raw", True)
                if self.config.gil
                else None
            )
            self._sampled.append(_Sampled(proc, stem, main, gil))
        for s in self._sampled:
            for sampler in (s.main, s.gil):
                if sampler:
                    sampler.start()
        if self._sampled:
            # py-spy reads the target's symbols and memory maps as it attaches: a burst of
            # CPU that, on a small machine, delayed the first requests of a scenario by
            # hundreds of ms. Let it finish before the scenario's clock starts.
            time.sleep(SETTLE_S)

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        if self._window != scenario or not self._sampled:
            return
        sampled, self._sampled, self._window = self._sampled, [], None
        stop_all([x for s in sampled for x in (s.main, s.gil) if x])
        for s in sampled:
            self._record(scenario, s)

    def stop(self) -> dict[str, Any]:
        if self._window is not None:
            self.scenario_end(self._window, time.monotonic_ns())
        if self._manifest:
            self._manifest.close()
            self._manifest = None
        return {
            "server": self.server,
            "config": dataclasses.asdict(self.config),
            "pyspy": self._version,
            "problem": self.problem,
            "notes": self.notes,
        }

    # --- helpers -------------------------------------------------------------------------------
    def _find(self) -> tuple[str | None, list[ServerProcess]]:
        d, target = self.discovery, self._target
        if d.pid is not None or d.port is not None:
            return find_server(d.server, pid=d.pid, port=d.port)
        if target.get("kind") == "embedded" and target.get("pid"):
            return find_server(target.get("server") or d.server, roots=[int(target["pid"])])
        if roots := server_pids(target):
            return find_server(d.server, roots=roots)
        if d.server != "auto":
            return find_server(d.server)
        where = (
            f"the server at {target['endpoint']} is not on this host "
            "(or nothing here listens on its port)"
            if target.get("endpoint")
            else "no server to sample was named"
        )
        raise CputaxError(
            f"{where}: py-spy must run where the server runs. Run `cputax profile` there, or "
            "pass --pid, --port or --target"
        )

    def _sampler(
        self, pid: int, stem: Path, suffix: str, log: str, fmt: str, gil: bool
    ) -> PyspyProcess:
        assert self._run is not None
        base = self._run.path / stem
        return PyspyProcess(
            self._exe,
            pid,
            Path(f"{base}.{suffix}"),
            Path(f"{base}.{log}"),
            self.config,
            fmt=fmt,
            gil_only=gil,
        )

    def _record(self, window: str, s: _Sampled) -> None:
        assert self._run is not None
        name = s.stem.name
        files = {"chrometrace": f"{s.stem}.chrometrace.json", "log": f"{s.stem}.log"}
        if s.gil and s.gil.output.exists():
            files["gil"] = f"{s.stem}.gil.txt"
        entry = {
            "window": window,
            "pid": s.process.pid,
            "role": s.process.role,
            "server": self.server,
            "cmdline": s.process.cmdline[:500],
            "rate": self.config.rate,
            "files": files,
            **meta(s.main),
        }
        if s.gil:
            entry["gil_sampler"] = meta(s.gil)
        if s.main.output.exists():
            try:
                files.update(
                    write_views(
                        self._run.path,
                        s.stem,
                        self.server,
                        f"{window}: {s.process.role} {s.process.pid}",
                        self.config.rate,
                    )
                )
            except CputaxError as exc:
                entry["status"], entry["message"] = "failed", str(exc)
        if self._manifest:
            self._manifest.write(entry)
        status, message = entry["status"], entry["message"]
        if status == "permission":
            self._disable(f"py-spy may not read process {s.process.pid} ({name}): {message}")
        elif status != "ok":
            self._note(f"{window}: {name}: {message}")
        if s.main.log.behind_warnings:
            self._note(
                f"{window}: {name}: py-spy fell behind (up to {s.main.log.behind_s:.1f} s late); "
                "lower --pyspy-rate"
            )

    def _disable(self, problem: str) -> None:
        if self.problem is None:
            self.problem = problem
            self.console.print(f"[yellow]py-spy: {problem}. Continuing without profiles.[/]")

    def _note(self, note: str) -> None:
        self.notes.append(note)
        self.console.print(f"[yellow]py-spy: {note}[/]")


def write_views(
    run_dir: Path, stem: Path, server: str | None, title: str, rate: float
) -> dict[str, str]:
    """Collapsed stacks, flamegraph SVG and speedscope file from one chrometrace."""
    timeline = read_chrometrace(Path(f"{run_dir / stem}.chrometrace.json"))
    stacks = {thread: collapse(spans, rate) for thread, spans in timeline.items()}
    files = {
        "collapsed": f"{stem}.collapsed.txt",
        "svg": f"{stem}.svg",
        "speedscope": f"{stem}.speedscope.json",
    }
    write_collapsed(run_dir / files["collapsed"], stacks)
    classifier = classifier_for(server)
    labels: dict[str, str | None] = {}
    weights: dict[tuple[str, ...], float] = {}
    for thread, counter in stacks.items():
        for stack, weight in counter.items():
            for frame in stack:
                labels.setdefault(frame.text(), classifier.frame_category(frame))
            key = (thread_root(thread), *(f.text() for f in stack))
            weights[key] = weights.get(key, 0.0) + weight
    (run_dir / files["svg"]).write_text(render_svg(weights, title, labels.get))
    write_speedscope(run_dir / files["speedscope"], timeline, title)
    return files
