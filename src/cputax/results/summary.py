"""summary.json as a typed result: a run's per-scenario decomposition, the server's own
metrics, the run's verdict on itself and the findings analysis drew from them.

Analysis builds a Summary whole; the report reads its fields. The JSON field names are
those summary.json has always had, so a file written before versions existed (version 1:
no `format_version`) still reads. Version 2 adds `format_version`, `findings` and
`in_short`.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from cputax.results import format as result_format

__all__ = [
    "FORMAT_VERSION",
    "READS",
    "Agentic",
    "AgentSession",
    "Agreement",
    "ClientCpu",
    "ClientLag",
    "Comparison",
    "Concurrency",
    "CriticalPath",
    "Finding",
    "GaugeStats",
    "GrowthRow",
    "Interrupted",
    "PartTimes",
    "PhaseStats",
    "PhaseTimes",
    "PrefixCache",
    "RunInfo",
    "ScenarioServerPhases",
    "ScenarioSummary",
    "ScheduleLag",
    "ServerMeans",
    "ServerMetrics",
    "ServerPhaseTimes",
    "ServerPhasesRun",
    "Skipped",
    "SpanClock",
    "Stats",
    "Summary",
    "Throughput",
    "TimelineBucket",
    "TurnParts",
    "Turns",
    "Verdict",
    "VerdictBounds",
]

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: summary.json before format versions; its fields are version 2's


class PhaseTimes(msgspec.Struct, kw_only=True):
    """One statistic (mean, p50 or p99) of each of the study's phases (ms); None: no request
    finished."""

    serialize: float | None = None
    http_overhead: float | None = None
    prefill: float | None = None
    decode: float | None = None
    response_parse: float | None = None
    total: float | None = None


class ClientLag(msgspec.Struct, kw_only=True):
    """The loop's stamp minus the kernel's at the first and last token (ms)."""

    p50: float
    p99: float
    max: float
    first_token_p99: float | None = None


class ClientCpu(msgspec.Struct, kw_only=True):
    """The client's own CPU per request: payload build (ms), stream parse per chunk (µs)."""

    build: float | None = None
    parse_per_chunk_us: float | None = None


class Throughput(msgspec.Struct, kw_only=True):
    requests_per_s: float | None = None
    output_tokens_per_s: float | None = None
    chunks_per_s: float | None = None


class GaugeStats(msgspec.Struct, kw_only=True):
    mean: float
    max: float


class ServerMetrics(msgspec.Struct, kw_only=True):
    """The server's own view of a scenario (Prometheus deltas). The maps are keyed by the
    quantities of the servers' metric tables (cputax.servers), which are data: None where
    the server does not export one."""

    mean_ms: dict[str, float | None] = {}
    histogram_counts: dict[str, float | None] = {}
    prefix_cache_hit_rate: float | None = None
    counters: dict[str, float | None] = {}
    gauges: dict[str, GaugeStats | None] = {}
    gauge_polls: int = 0
    api_server_cpu_s_per_request: float | None = None
    gauge_polls_total: int | None = None


class VerdictBounds(msgspec.Struct, kw_only=True):
    """analysis.invariants.Bounds as written (ms)."""

    tolerance_ms: float = 0.05
    p99_ms: float = 5.0
    stall_ms: float = 20.0


class Verdict(msgspec.Struct, kw_only=True):
    """A scenario's invariants: rows checked, rows breaking any, count per cause."""

    ok: bool
    checked: int
    broken: int
    causes: dict[str, int] = {}  # by cause name (analysis.invariants.CAUSES)
    bounds: VerdictBounds = msgspec.field(default_factory=VerdictBounds)


class ScheduleLag(msgspec.Struct, kw_only=True):
    """Open loop: start minus intended start (ms), and latency from the intended start."""

    requests: int
    p50: float
    p99: float
    max: float
    ttft_from_intended_p50: float | None = None
    ttft_from_intended_p99: float | None = None
    total_from_intended_p50: float | None = None
    total_from_intended_p99: float | None = None


class PhaseStats(msgspec.Struct, kw_only=True):
    n: int
    mean: float
    p50: float
    p99: float
    min: float


class ServerPhaseTimes(msgspec.Struct, kw_only=True):
    """Each request's own server phases over a scenario (analysis.server_phases.PHASES)."""

    http_in: PhaseStats | None = None
    front_end: PhaseStats | None = None
    engine_queue: PhaseStats | None = None
    model_prefill: PhaseStats | None = None
    decode: PhaseStats | None = None
    stream_out: PhaseStats | None = None


class Comparison(msgspec.Struct, kw_only=True):
    """The client's and the server's figure of one interval over a scenario."""

    client_p50_ms: float
    server_p50_ms: float
    diff_p50_ms: float
    tolerance_ms: float
    agree: bool
    requests_agreeing: float
    n: int
    finding: str | None = None


class Agreement(msgspec.Struct, kw_only=True):
    ttft: Comparison | None = None
    prefill: Comparison | None = None


class ServerMeans(msgspec.Struct, kw_only=True):
    queue: float | None = None
    prefill: float | None = None
    decode: float | None = None
    ttft: float | None = None
    e2e: float | None = None


class ScenarioServerPhases(msgspec.Struct, kw_only=True):
    """One scenario's server phases: coverage, the phases, negatives, the two agreements."""

    records: int = 0
    with_server: int = 0
    coverage: float | None = None
    sources: dict[str, int] = {}  # by source ("otlp", "response")
    first_token_merged: int = 0
    records_without_span: int = 0
    spans_without_record: int = 0
    phases_ms: ServerPhaseTimes = msgspec.field(default_factory=ServerPhaseTimes)
    negative: dict[str, int] = {}  # by phase, only those with negatives
    agreement: Agreement = msgspec.field(default_factory=Agreement)
    per_request_mean_ms: ServerMeans = msgspec.field(default_factory=ServerMeans)
    prometheus_mean_ms: ServerMeans = msgspec.field(default_factory=ServerMeans)


class SpanClock(msgspec.Struct, kw_only=True):
    """How the server's span times (its wall clock) were put on the client's clock.

    Every matched request bounds the offset (server clock - client clock): the server saw
    the request after the client began sending it and before the client received the
    response headers. [lo_ns, hi_ns] is what all of them allow; `applied_ns` is the offset
    used (0 for a server on this host, else the middle of the bounds), `consistent` whether
    one offset fits every request."""

    requests: int
    lo_ns: int | None = None
    hi_ns: int | None = None
    applied_ns: int = 0
    consistent: bool = True
    on_this_host: bool = True


class ServerPhasesRun(msgspec.Struct, kw_only=True):
    """The run's line of the server phases: which source, spans, findings, a note."""

    source: str = "none"
    spans_received: int = 0
    spans_matched: int = 0
    spans_outside_windows: int = 0
    clock_error_ns: int | None = None
    span_clock: SpanClock | None = None
    # over the scenarios with records: records no span joined, spans no record joined
    records_without_span: int = 0
    spans_without_record: int = 0
    findings: list[str] = []
    note: str | None = None


class ScenarioSummary(msgspec.Struct, kw_only=True):
    """One scenario: the decomposition, the client's view of itself, the server's metrics
    and the run's verdict on its records."""

    name: str
    concurrency: int | None = None
    context_tokens: int | None = None
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = {}  # by the error's kind (its text up to ": ")
    prompt_tokens_mean: float | None = None
    prompt_tokens_off_pct: float | None = None
    prompt_tokens_flagged: bool = False
    output_tokens_mean: float | None = None
    output_tokens_source: list[str] = []
    mean_ms: PhaseTimes = msgspec.field(default_factory=PhaseTimes)
    mean_share_pct: PhaseTimes | None = None  # each phase's mean, % of the mean total
    p50_ms: PhaseTimes = msgspec.field(default_factory=PhaseTimes)
    p99_ms: PhaseTimes = msgspec.field(default_factory=PhaseTimes)
    clock: str | None = None
    client_lag_ms: ClientLag | None = None
    shared_stamps_pct: float | None = None
    client_cpu_ms: ClientCpu = msgspec.field(default_factory=ClientCpu)
    cpu_pct: float | None = None
    gpu_pct: float | None = None
    server: ServerMetrics | None = None
    wall_s: float | None = None
    throughput: Throughput | None = None
    achieved_concurrency: float | None = None
    past_client_ceiling: bool | None = None
    invariants: Verdict | None = None
    withheld: str | None = None  # why CPU% / GPU% are None: the records break the invariants
    schedule_lag_ms: ScheduleLag | None = None
    server_phases: ScenarioServerPhases | None = None
    gpu_bubble_pct: float | None = None  # the emulated GPU's idle share with work pending


class GrowthRow(msgspec.Struct, kw_only=True):
    """One scenario's HTTP overhead against the lowest concurrency at its context size
    (analysis.decompose.http_overhead_growth); not written to summary.json."""

    context_tokens: int | None
    concurrency: int | None
    scenario: str
    http_overhead_ms: float
    p99_ms: float | None = None
    growth: float | None = None  # mean HTTP overhead / the lowest concurrency's; None: it was 0


class Host(msgspec.Struct, kw_only=True):
    cpu_model: str | None = None
    cpus: int | None = None
    python: str | None = None
    platform: str | None = None


class RunInfo(msgspec.Struct, kw_only=True):
    """What run.json says of the run, as the summary keeps it."""

    endpoint: str | None = None
    model: str | None = None
    profile: str | None = None
    prompt_counter: str | None = None
    host: Host | None = None


class Skipped(msgspec.Struct, kw_only=True):
    name: str
    reason: str


class Interrupted(msgspec.Struct, kw_only=True):
    """A run stopped by a signal: which, and the scenarios whose window it cut short."""

    signal: str | None = None
    scenarios: list[str] = []


class Stats(msgspec.Struct, kw_only=True):
    mean: float | None = None
    p50: float | None = None
    p99: float | None = None


class TurnParts(msgspec.Struct, kw_only=True):
    """A turn's parts (analysis.agentic.PARTS), in their order."""

    think: Stats = msgspec.field(default_factory=Stats)
    client: Stats = msgspec.field(default_factory=Stats)
    front_end: Stats = msgspec.field(default_factory=Stats)
    engine: Stats = msgspec.field(default_factory=Stats)


class PartTimes(msgspec.Struct, kw_only=True):
    think: float = 0.0
    client: float = 0.0
    front_end: float = 0.0
    engine: float = 0.0


class Turns(msgspec.Struct, kw_only=True):
    count: int
    ms: TurnParts
    cycle_ms: Stats
    share_of_cycle_pct: PartTimes | None = None  # each part's mean, % of the mean cycle


class CriticalPath(msgspec.Struct, kw_only=True):
    agent: str
    chain: list[str]
    turns: int
    wall_s: float
    ms: PartTimes
    share_pct: PartTimes | None = None  # each part, % of wall_s


class AgentSession(msgspec.Struct, kw_only=True):
    session: str
    requests: int
    errors: int
    subagents: int
    critical_path: CriticalPath


class TimelineBucket(msgspec.Struct, kw_only=True):
    t_s: float
    agents: float
    requests: float
    subagent_requests: float


class Concurrency(msgspec.Struct, kw_only=True):
    agents_mean: float
    agents_max: int
    requests_mean: float
    requests_max: int
    subagent_requests_max: int
    timeline: list[TimelineBucket]


class PrefixCache(msgspec.Struct, kw_only=True):
    trace_file: float | None = None
    replayed_ideal: float | None = None
    server: float | None = None


class Agentic(msgspec.Struct, kw_only=True):
    """A replay's sessions: turn parts, critical paths, concurrency, prefix-cache hits."""

    turns: Turns
    sessions: list[AgentSession]
    concurrency: Concurrency
    prefix_cache: PrefixCache
    skipped_over_context: int = 0  # requests longer than --max-context, over all conversations
    dropped_by_limit: int = 0  # requests past --limit-requests


class Finding(msgspec.Struct, kw_only=True):
    """A judgment analysis made of a scenario (or of the run, scenario None): what kind, in
    words, and the threshold it crossed (None for a judgment without one)."""

    kind: str
    text: str
    scenario: str | None = None
    threshold: float | None = None


class Summary(msgspec.Struct, kw_only=True):
    """summary.json. Its `format_version` is always written (no omitted defaults here)."""

    format_version: int = FORMAT_VERSION
    run: RunInfo = msgspec.field(default_factory=RunInfo)
    scenarios: list[ScenarioSummary] = []
    server_phases: ServerPhasesRun | None = None
    skipped: list[Skipped] = []
    shard_failures: list[str] = []
    clock_steps: int = 0  # the wall clock set during the run
    interrupted: Interrupted | None = None
    agentic: Agentic | None = None
    findings: list[Finding] = []
    in_short: str | None = None  # the report's two opening lines

    @classmethod
    def load(cls, path: Path) -> Summary:
        """Read summary.json (versions READS); another version is one CputaxError line."""
        return result_format.load(
            path,
            cls,
            READS,
            f"remove it and run `cputax report {path.parent}` to rebuild it from the run's records",
        )

    @classmethod
    def check_version(cls, path: Path) -> None:
        """The one CputaxError line when `path` holds a summary of a version this cputax does
        not read (a newer cputax's); a file that is not JSON at all passes (a rebuild
        replaces it)."""
        try:
            version = msgspec.json.decode(
                path.read_bytes(), type=result_format.Versioned
            ).format_version
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if version not in READS:
            cls.load(path)  # raises, saying which version and how to rebuild

    def dump(self, path: Path) -> None:
        """Write summary.json (atomically)."""
        result_format.dump(path, self)

    def scenario(self, name: str) -> ScenarioSummary | None:
        """The scenario of that name, or None."""
        return next((s for s in self.scenarios if s.name == name), None)
