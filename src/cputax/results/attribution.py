"""pyspy/attribution.json: where the server's CPU time went, per scenario window, process and
thread (analysis.attribution builds it whole; report.profiling renders it).

The JSON field names are those of the untyped files before format versions existed, so
those (version 1: no `format_version`, no findings, no overhead) still decode. A share of
a thread's time comes with its 95% Wilson interval (analysis.support) in `intervals`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from cputax.results import format

__all__ = [
    "ACCEPTS",
    "FORMAT_VERSION",
    "AttributionResult",
    "FileAttribution",
    "Finding",
    "FrameCount",
    "GilInIdleFrames",
    "GilThread",
    "Headline",
    "OverheadPair",
    "OwnMetrics",
    "ProcessView",
    "SamplingOverhead",
    "ScrapeCost",
    "StepWait",
    "ThreadRow",
    "ThreadShares",
    "Window",
    "WorkerWait",
]

FORMAT_VERSION = 2
ACCEPTS = (1, 2)  # 1: written before versions (no findings, no overhead)
REBUILD = "rebuild it with `cputax report DIR`"

FrameCount = tuple[str, int]  # an innermost frame and its samples
Interval = tuple[float, float]  # a share's 95% Wilson interval


class GilThread(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thread's GIL, from the --gil sampler: the share of samples it held the GIL, the
    part of those in frames the rules call idle, and those frames."""

    share: float
    in_idle_frames: float = 0.0
    idle_frames: list[FrameCount] = []


class ProcessView(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One sampled process in one window: what py-spy reported about itself."""

    process: str  # "role pid": the key threads name their process by
    pid: int
    role: str
    status: str
    message: str | None = None
    files: dict[str, str] = {}  # kind (chrometrace, svg, speedscope, gil...) -> path in the run
    behind_s: float = 0.0
    pyspy_cpu_s: float | None = None
    effective_rate: float | None = None
    fell_behind: bool = False
    coverage: float | None = None  # share of the window the sampler saw
    partial: bool = False  # coverage under analysis.attribution.FULL_COVERAGE: a warning
    gil: float | None = None  # with --pyspy-gil: the GIL held, summed over its threads
    gil_threads: dict[str, GilThread] | None = None  # by tid (as text)


class ThreadRow(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One thread's shares of its wall time over a window, idle included (they sum to 1)."""

    process: str
    pid: int | None = None
    thread: str
    tid: int | None = None
    samples: int
    categories: dict[str, float] = {}
    active: float | None = None  # not idle
    empty: int = 0  # samples with no stack at all
    too_few: bool = False  # below analysis.support.MIN_SAMPLES: never a share
    intervals: dict[str, Interval] = {}
    active_interval: Interval | None = None
    role: str | None = None
    # with host telemetry: on a CPU and in the run queue (schedstat), and whether py-spy agrees
    on_cpu: float | None = None
    runqueue: float | None = None
    cpu_agrees: bool | None = None
    schedstat: float | None = None  # on_cpu + runqueue: schedstat's busy, beside py-spy's
    # with --pyspy-gil
    gil: float | None = None
    gil_in_idle_frames: float | None = None
    gil_idle_frames: list[FrameCount] = []
    gil_wait: float | None = None  # estimated: busy - on a CPU - ready for one


class WorkerWait(msgspec.Struct, tag="worker_wait", kw_only=True):
    """An engine loop that spends much of its time waiting for its workers' model step."""

    process: str
    thread: str
    wait: float
    scheduling: float  # schedule + kv_cache + prefix_hash
    queue_ms: float | None = None  # the engine's own mean queue time, when it is worth saying


class StepWait(msgspec.Struct, tag="step_wait", kw_only=True):
    """A worker that spends much of its time waiting for the engine's next step."""

    process: str
    thread: str
    share: float


class OwnMetrics(msgspec.Struct, tag="metrics", kw_only=True):
    """The server's own request instrumentation, per thread where it shows."""

    threads: list[tuple[str, str, float]]  # process, thread, share


class GilInIdleFrames(msgspec.Struct, tag="gil_idle", kw_only=True):
    """A thread holding the GIL in frames the rules call idle (an event loop's C code)."""

    process: str
    thread: str
    gil: float
    in_idle: float  # points of the GIL held in idle frames
    frames: list[str]


class ScrapeCost(msgspec.Struct, tag="scrape", kw_only=True):
    """What answering cputax's own /metrics polls cost the server."""

    polls: int
    thread_s: float
    per_poll_s: float = 0.0  # thread_s / polls


Finding = WorkerWait | StepWait | OwnMetrics | GilInIdleFrames | ScrapeCost


class Headline(msgspec.Struct, kw_only=True):
    """A window's busiest (thread, category) pair, idle and other left out."""

    process: str
    thread: str
    role: str | None = None
    category: str
    share: float


class Window(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One scenario window (the client's timestamps; none for a file or a profile)."""

    name: str
    start_ns: int | None = None
    end_ns: int | None = None
    wall_s: float | None = None
    processes: list[ProcessView] = []
    categories: dict[str, float] = {}  # over all its threads
    threads: list[ThreadRow] = []
    other_top: list[FrameCount] = []  # innermost frames no rule matched
    findings: list[Finding] = []  # analysis.profiling_findings
    # the categories worth a column (analysis.attribution.MIN_SHARE), busiest first, then
    # other and idle; and the busiest pair, None when no category reaches MIN_SHARE
    columns: list[str] = []
    headline: Headline | None = None


class OverheadPair(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A scenario run with and without py-spy (`--pyspy-overhead`)."""

    name: str
    tps_on: float | None = None  # output tokens/s
    tps_off: float | None = None
    tps_change_pct: float | None = None
    ttft_on_ms: float | None = None  # serialize + HTTP overhead + prefill, means
    ttft_off_ms: float | None = None
    ttft_change_pct: float | None = None
    pyspy_core_pct: float | None = None  # py-spy's own CPU, % of one core
    pyspy_cores_pct: float | None = None  # the same, % of all the machine's cores


class SamplingOverhead(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The pairs and their verdict: the mean of the per-pair differences (with the order
    alternating, drift and order effects cancel in it)."""

    pairs: list[OverheadPair]
    budget_pct: float
    cpus: int | None = None
    tps_mean_pct: float | None = None
    tps_min_pct: float | None = None
    tps_max_pct: float | None = None
    ttft_mean_pct: float | None = None
    pyspy_core_pct: float | None = None
    pairs_measured: int = 0  # pairs with a throughput on both sides


class AttributionResult(msgspec.Struct, kw_only=True):
    """pyspy/attribution.json."""

    format_version: int = FORMAT_VERSION
    server: str | None = None
    rules: str
    alignment_ms: float
    rate: float
    windows: list[Window] = []
    other_top: list[FrameCount] = []
    config: dict[str, object] | None = None  # the sampler's (run.json's monitors.pyspy.config)
    overhead: SamplingOverhead | None = None

    def dump(self, path: Path) -> None:
        format.dump(path, self)

    @classmethod
    def load(cls, path: Path) -> AttributionResult:
        return format.load(path, cls, ACCEPTS, REBUILD)


class ThreadShares(msgspec.Struct, kw_only=True):
    """Overall and per-thread shares, the top `other` frames (analysis.attribution.summarize)."""

    categories: dict[str, float]
    threads: list[ThreadRow]
    other_top: list[FrameCount]


class FileAttribution(msgspec.Struct, kw_only=True):
    """`cputax attribute FILE`: one py-spy file's shares (printed, never stored)."""

    server: str | None
    source: str
    categories: dict[str, float]
    threads: list[ThreadRow]
    other_top: list[FrameCount]
    columns: list[str] = []  # as Window.columns
