"""correlation.json: per scenario, when the GPU sat idle while work was pending and what
the server's threads did then, the server's CPU per process, and the timeline series
(analysis.correlate builds it whole, analysis.emulated adds the emulated GPU's truth;
report.telemetry, report.emulated and report.plots render it).

The JSON field names are those of the untyped files before format versions existed, so
those (version 1: no `format_version`) still decode.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from cputax.results import format

__all__ = [
    "ACCEPTS",
    "FORMAT_VERSION",
    "CorrelationResult",
    "EmulatedGpu",
    "GpuStalls",
    "HostMeta",
    "HostProcess",
    "HostThread",
    "HostUsage",
    "Percentiles",
    "Scenario",
    "Share",
    "Timeline",
]

FORMAT_VERSION = 2
ACCEPTS = (1, 2)
REBUILD = "rebuild it with `cputax report DIR`"


class Share(msgspec.Struct, kw_only=True, frozen=True):
    """One part's share of a whole, as analysis chose and ordered it for the report."""

    name: str
    pct: float  # % of the whole


class GpuStalls(msgspec.Struct, kw_only=True, omit_defaults=True):
    """GPU busy, idle and stalls (idle while a request was in flight) over one window, the
    stall time split by where the work was and by what the server's threads did."""

    source: str
    backend: str
    resolution_ms: float  # the bin: no stall is shorter, each end is uncertain by one
    resolution_basis: str = ""
    alignment_ms: float | None = None
    idle_below_pct: float
    coverage_pct: float | None = None
    busy_pct: float | None = None
    idle_pct: float | None = None
    idle_nothing_pending_pct: float | None = None
    stall_s: float = 0.0
    stall_pct: float | None = None
    stalls: int = 0
    longest_stall_ms: float = 0.0
    stall_by_state: dict[str, float] = {}  # engine, front_end, client -> seconds
    stall_split: dict[str, float] = {}  # category (or why none) -> seconds
    stall_split_top: list[Share] = []  # the largest parts of stall_split, % of stall_s
    stall_thread_s: dict[str, float] = {}  # category -> busy thread seconds during stalls


class HostThread(msgspec.Struct, kw_only=True, omit_defaults=True):
    tid: int
    name: str
    cpu_pct: float


class HostProcess(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One process over a window: % of one core, run-queue wait, switches, busiest threads."""

    pid: int
    name: str
    role: str
    server_role: str | None = None
    cpu_pct: float
    wait_pct: float = 0.0
    switches_per_s: float = 0.0
    threads: list[HostThread] = []
    quiet: bool = False  # under HostUsage.quiet_below_pct: counted in the report, not listed


class HostUsage(msgspec.Struct, kw_only=True, omit_defaults=True):
    system_busy_pct: float | None = None
    cpus: int | None = None
    processes: list[HostProcess] = []
    quiet_below_pct: float | None = None  # a process under this CPU (% of one core) is quiet


class Timeline(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Binned series for the timeline plot, seconds from the window's start."""

    t_s: list[float]  # each bin's start
    end_s: float
    width_s: float
    inflight: dict[str, list[float]] = {}  # phase -> requests in flight per bin
    stalls: list[tuple[float, float]] = []
    gpu: list[float | None] | None = None  # busy % per bin
    cpu: dict[str, list[float]] | None = None  # cores per bin, by category or process
    cpu_by: str | None = None  # "category" (py-spy) or "process" (host telemetry)


class Percentiles(msgspec.Struct, kw_only=True, frozen=True):
    p50: float | None = None
    p99: float | None = None


class EmulatedGpu(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The emulated GPU's own steps over one window (analysis.emulated)."""

    steps: int
    busy_pct: float | None = None
    step_ms: Percentiles = Percentiles()
    model_error_ms: Percentiles = Percentiles()
    model_error_ms_max: float | None = None
    wake_lag_ms: Percentiles = Percentiles()  # done until its thread ran again
    step_cpu_pct: float | None = None
    bubbles: int = 0  # gaps between steps while a request was at the engine
    bubble_ms: Percentiles = Percentiles()
    bubble_s: float = 0.0
    bubble_pct: float | None = None
    bubble_split: dict[str, float] = {}
    bubble_split_top: list[Share] = []  # the largest parts of bubble_split, % of its total
    bubble_thread_s: dict[str, float] = {}


class Scenario(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    wall_s: float
    gpu: GpuStalls | None = None
    host: HostUsage | None = None
    timeline: Timeline | None = None
    emulated_gpu: EmulatedGpu | None = None


class HostMeta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the report says of host telemetry's sampling (telemetry.jsonl's own meta)."""

    interval_ms: float | None = None
    poll_gap_ms_p50: float | None = None
    thread_cpu: str | None = None


class CorrelationResult(msgspec.Struct, kw_only=True):
    """correlation.json."""

    format_version: int = FORMAT_VERSION
    telemetry: bool = False
    gpu_backend: str | None = None
    pyspy: bool = False
    pyspy_alignment_ms: float | None = None
    notes: list[str] = []
    host_meta: HostMeta | None = None
    scenarios: list[Scenario] = []
    emulated_gpu: bool = False

    def dump(self, path: Path) -> None:
        format.dump(path, self)

    @classmethod
    def load(cls, path: Path) -> CorrelationResult:
        return format.load(path, cls, ACCEPTS, REBUILD)
