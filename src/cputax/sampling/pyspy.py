"""One py-spy per server process: start it, stop it, read what it said.

Why one sampler per process, in chrometrace format only: chrometrace is the one py-spy
format with time, and per-scenario windows and GPU-idle correlation need time. Each
process gets its own file (with --subprocesses py-spy mixes processes in one timeline).
The collapsed stacks, the flamegraph SVG and the speedscope file are all derived from
that timeline afterwards (py-spy has no converter, and a second sampler per process would
double its cost). The one exception is --gil: a trace that keeps only the GIL holder
cannot be a per-thread timeline, so the GIL share comes from a second, raw-format
sampler, only when asked for.

py-spy's chrometrace `ts` counts microseconds from the moment py-spy builds its recorder,
just after it starts and before it attaches; cputax stamps time.monotonic_ns() around
the launch, so `ts` maps onto the run's clock within a few milliseconds (see ALIGNMENT).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError
from cputax.util import die_with_parent

# py-spy costs ~0.75 ms of CPU per sample of a 5-thread process here, mostly system time
# (process_vm_readv), whatever the format: 100 Hz is ~7.5% of a core, 25 Hz ~2%. On a
# loaded 2-core machine that CPU comes out of the server's; see docs/measurements.md for the
# throughput and TTFT measured with and without sampling.
DEFAULT_RATE = 25
STOP_TIMEOUT_S = 60.0  # py-spy writes its whole trace after SIGINT
INSTALL_HINT = "pip install 'cputax[pyspy]' (or pip install py-spy)"
_BEHIND = re.compile(r"([\d.]+)\s*(ms|s|µs|us)\s+behind in sampling")
_WROTE = re.compile(r"Samples: (\d+) Errors: (\d+)")
_UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6}
_PTRACE_CAP = 19  # CAP_SYS_PTRACE


def _sampler_child() -> None:
    """In py-spy's process before exec: SIGINT is how it is told to write what it has and
    exit, also when cputax dies (never sample forever). A parent that ignores or blocks
    SIGINT (a Ray worker does) would pass that on through exec: undone here."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    die_with_parent(signal.SIGINT)


@dataclass
class SamplerConfig:
    rate: int = DEFAULT_RATE
    gil: bool = False  # also sample the GIL holder (a second py-spy per process)
    native: bool = (
        False  # C/C++ frames too; py-spy then has to pause the process (no --nonblocking)
    )
    nonblocking: bool = True

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise CputaxError(f"--rate must be positive, got {self.rate}")
        if self.native:
            self.nonblocking = (
                False  # "Can't get native stack traces with the --nonblocking option"
            )

    def describe(self) -> str:
        mode = "nonblocking" if self.nonblocking else "blocking (pauses the process per sample)"
        extra = "".join(
            f", {x}" for x, on in (("--gil", self.gil), ("--native", self.native)) if on
        )
        return f"{self.rate} Hz, {mode}, --threads --idle{extra}"


def find_pyspy() -> str:
    """The py-spy executable: beside this interpreter first (a venv need not be on PATH)."""
    beside = Path(sys.executable).parent / "py-spy"
    exe = str(beside) if os.access(beside, os.X_OK) else shutil.which("py-spy")
    if exe is None:
        raise CputaxError(f"py-spy is not installed: {INSTALL_HINT}")
    return exe


def pyspy_version(exe: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return "py-spy (version unknown)"


def ptrace_fix(scope: str | None = None) -> str:
    scope = scope if scope is not None else _read("/proc/sys/kernel/yama/ptrace_scope")
    now = f" (now {scope})" if scope is not None else ""
    return (
        "run cputax as root, or give it CAP_SYS_PTRACE (docker run --cap-add SYS_PTRACE) and "
        f"allow ptrace with `sysctl kernel.yama.ptrace_scope=0`{now}"
    )


def ptrace_problem(pids: list[int]) -> str | None:
    """Why py-spy will not be allowed to read these processes, or None when it should be.

    py-spy reads another process's memory: that needs root, or CAP_SYS_PTRACE, or the same
    user with Yama's ptrace_scope 0 (scope 1 only allows a debugger that is an ancestor,
    and py-spy is a sibling of the server)."""
    if os.geteuid() == 0 or _has_cap(_PTRACE_CAP):
        return None
    scope = _read("/proc/sys/kernel/yama/ptrace_scope")
    me = os.geteuid()
    for pid in pids:
        try:
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            continue
        if owner != me or (scope is not None and scope != "0"):
            return f"no permission to ptrace process {pid}: {ptrace_fix(scope)}"
    return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _has_cap(bit: int) -> bool:
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> bit & 1)
    return False


@dataclass
class PyspyLog:
    """What py-spy printed, digested."""

    # ok, exited (the process ended while sampled: data kept), permission, not_python,
    # gone, failed
    status: str = "ok"
    samples: int | None = None  # thread stacks recorded (one per thread per sample)
    errors: int | None = None
    behind_s: float = 0.0  # the worst lag py-spy reported (it warns past 1 s)
    behind_warnings: int = 0
    message: str | None = None


def read_log(text: str, returncode: int | None) -> PyspyLog:
    log = PyspyLog()
    for m in _BEHIND.finditer(text):
        log.behind_warnings += 1
        log.behind_s = max(log.behind_s, float(m[1]) * _UNITS[m[2]])
    if m := _WROTE.search(text):
        log.samples, log.errors = int(m[1]), int(m[2])
    if "Permission Denied" in text or "Operation not permitted" in text:
        log.status, log.message = "permission", f"no permission to ptrace it: {ptrace_fix()}"
    elif "Failed to find python version" in text or "Failed to find a python interpreter" in text:
        log.status, log.message = "not_python", "not a Python process"
    elif "Check that the process is running" in text or "No such process" in text:
        log.status, log.message = "gone", "the process was gone before py-spy attached"
    elif "process exited" in text or "process ended" in text:
        log.status, log.message = (
            "exited",
            "the process exited while sampled: its partial data is kept",
        )
    elif log.samples is None:
        last = [line for line in text.splitlines() if line.strip()][-1:] or [
            f"exit status {returncode}"
        ]
        log.status, log.message = "failed", last[0].strip()[:300]
    return log


@dataclass
class PyspyProcess:
    """One `py-spy record` attached to one pid until stop()."""

    exe: str
    pid: int
    output: Path
    log_path: Path
    config: SamplerConfig
    fmt: str = "chrometrace"
    gil_only: bool = False
    t_launch_ns: int = 0  # monotonic just before the launch
    t_launched_ns: int = 0  # monotonic once the exec happened (Popen returns after it)
    t_stop_ns: int = 0
    cpu_s: float | None = None  # py-spy's own CPU time (user + system) when stopped
    log: PyspyLog = field(default_factory=PyspyLog)
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        cmd = [
            self.exe,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.config.rate),
            "--format",
            self.fmt,
            "--output",
            str(self.output),
            "--threads",
            "--nolineno",
        ]
        cmd += ["--gil"] if self.gil_only else ["--idle"]
        if self.config.nonblocking:
            cmd.append("--nonblocking")
        if self.config.native:
            cmd.append("--native")
        return cmd

    def start(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command()) + "\n").encode())
            log.flush()
            self.t_launch_ns = time.monotonic_ns()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_sampler_child,
            )
            self.t_launched_ns = time.monotonic_ns()

    def signal_stop(self) -> None:
        """Ask py-spy to write what it has (SIGINT); stop() then waits for it."""
        proc = self._proc
        self.t_stop_ns = time.monotonic_ns()
        if proc is None or proc.poll() is not None:
            return
        self.cpu_s = _cpu_seconds(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)

    def stop(self) -> PyspyLog:
        proc = self._proc
        if proc is None:
            return self.log
        if not self.t_stop_ns:
            self.signal_stop()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._proc = None
        self.log = read_log(self.log_path.read_text(errors="replace"), proc.returncode)
        if self.log.status == "ok" and not self.output.exists():
            self.log.status, self.log.message = "failed", f"py-spy wrote no {self.output.name}"
        return self.log

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None


def _cpu_seconds(pid: int) -> float | None:
    import psutil

    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    return None


def stop_all(samplers: list[PyspyProcess]) -> None:
    """SIGINT them all first, then wait: they write their files in parallel."""
    for s in samplers:
        s.signal_stop()
    for s in samplers:
        s.stop()


def meta(sampler: PyspyProcess) -> dict[str, Any]:
    """The manifest fields of one sampler."""
    log = sampler.log
    return {
        "t_launch_ns": sampler.t_launch_ns,
        "t_launched_ns": sampler.t_launched_ns,
        "t_stop_ns": sampler.t_stop_ns,
        "status": log.status,
        "message": log.message,
        "samples": log.samples,
        "errors": log.errors,
        "behind_s": log.behind_s,
        "behind_warnings": log.behind_warnings,
        "cpu_s": sampler.cpu_s,
    }
