"""sweep.json as a typed result: the plan of a sweep, each step's outcome as it happens, then
the comparison analysis.sweep makes of the configurations (deltas against the baseline and
the study's claims), which the report renders field by field.

The JSON field names are those sweep.json has always had, so a file written before versions
existed (version 1: no `format_version`) still reads. Version 2 adds `format_version`, the
delta's `noise`, the metric's `half_spread` and `spread_basis`. rundir.SweepDir owns the
sweep folder's paths; Sweep.load / dump are the one way the file is read and written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from cputax.results import format as result_format
from cputax.results.comparison import Delta
from cputax.results.metric import Metric

__all__ = [
    "FORMAT_VERSION",
    "METRICS",
    "READS",
    "Claim",
    "ConfigScenario",
    "Configuration",
    "EngineLoop",
    "GilRow",
    "MetricValue",
    "ServerInfo",
    "Step",
    "Sweep",
    "SweepComparison",
    "SweepDelta",
    "TargetInfo",
]

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: sweep.json before format versions; its fields are version 2's

# What the comparison measures of each configuration and scenario (the keys of
# ConfigScenario.metrics), as the report names it.
METRICS: dict[str, Metric] = {
    "http_overhead_ms": Metric("time to headers", "ms"),
    "queue_ms": Metric("server queue", "ms"),
    "prefill_ms": Metric("prefill (client)", "ms"),
    "decode_ms": Metric("decode", "ms"),
    "ttft_ms": Metric("TTFT (client)", "ms"),
    "itl_ms": Metric("time between tokens", "ms"),
    "output_tokens_per_s": Metric("output tokens/s", "tok/s", higher_is_better=True),
    "cpu_pct": Metric("CPU% (the study's)", "%"),
    "api_server_cpu_pct": Metric("API server CPU", "% of a core"),
    "engine_core_cpu_pct": Metric("EngineCore CPU", "% of a core"),
    "worker_cpu_pct": Metric("worker CPU", "% of a core"),
    "prefix_hash_share": Metric("prefix hashing, of EngineCore busy time", "%"),
    "schedule_share": Metric("scheduling + KV cache, of the engine loop", "%"),
    "worker_wait_share": Metric("waiting for the model step, of the engine loop", "%"),
    # the emulated GPU (cputax.emulation): a request's whole time, and the GPU's bubbles
    "total_ms": Metric("request time (client)", "ms"),
    "gpu_bubble_pct": Metric("emulated GPU idle while requests waited", "% of wall"),
}


class Step(msgspec.Struct, kw_only=True):
    """One run of the plan: a configuration's repeat, its folder, and how it went."""

    configuration: str
    repeat: int = 0
    folder: str
    args: list[str] = []  # the server flags of the configuration
    status: str = "planned"  # planned, ok, errors (finished with problems), refused, failed
    message: str | None = None  # why refused or failed, in one line
    log_tail: list[str] = []  # of a server that did not come up
    problems: list[str] = []  # of a run that finished with errors


class MetricValue(msgspec.Struct, kw_only=True):
    """One measurement of a configuration: the mean over its repeats, its spread (the
    largest of the range over the repeats and the within-run spreads), each repeat's value."""

    value: float | None = None
    spread: float | None = None
    values: list[float] = []
    half_spread: float | None = None  # what the report writes after ±
    spread_basis: list[str] = []  # what the spread was measured by: repeats, batches, interval


class EngineLoop(msgspec.Struct, kw_only=True):
    """The engine loop thread's shares of its wall time (vLLM: EngineCore's MainThread)."""

    worker_wait: float
    schedule: float  # scheduling + KV cache
    ipc: float
    busy: float
    samples: int


class GilRow(msgspec.Struct, kw_only=True):
    """A thread with GIL data (--pyspy-gil): held, estimated wait, held in idle frames."""

    role: str
    process: str
    thread: str
    busy: float | None = None
    held: float | None = None
    wait: float | None = None
    in_idle_frames: float | None = None
    idle_frames: list[tuple[str, int]] = []  # an innermost frame and its samples


class ConfigScenario(msgspec.Struct, kw_only=True):
    """A configuration's view of one scenario over its repeats (the first repeat's py-spy)."""

    metrics: dict[str, MetricValue] = {}  # by METRICS key
    requests: int = 0
    errors: int = 0
    roles: dict[str, dict[str, float]] = {}  # role -> category -> % of one core
    engine_loop: EngineLoop | None = None
    gil: list[GilRow] = []
    concurrency: int | None = None
    context_tokens: int | None = None


class ServerInfo(msgspec.Struct, kw_only=True):
    """What the run's run.json says of the server, as the sweep keeps it."""

    name: str | None = None
    version: str | None = None


class TargetInfo(msgspec.Struct, kw_only=True):
    kind: str | None = None  # "embedded": cputax started it
    server: str | None = None


class Configuration(msgspec.Struct, kw_only=True):
    name: str
    folders: list[str] = []  # the runs that finished (ok or with errors)
    repeats: int = 0
    failed: list[Step] = []  # refused or failed
    scenarios: dict[str, ConfigScenario] = {}
    server: ServerInfo | None = None
    target: TargetInfo | None = None


class SweepDelta(msgspec.Struct, kw_only=True):
    """A configuration's scenario against the baseline's, one row per METRICS key."""

    configuration: str
    scenario: str
    rows: list[Delta] = []


class Claim(msgspec.Struct, kw_only=True):
    """What the study claimed, and what this server shows (analysis.claims). `data`: the
    figures the sentence turns on, by name."""

    claim: str
    study: str
    finding: str
    spread: str | None = None
    sentence: str
    decided: bool
    data: dict[str, Any] = {}


class SweepComparison(msgspec.Struct, kw_only=True):
    baseline: str | None = None  # the first configuration measured
    configurations: list[Configuration] = []
    deltas: list[SweepDelta] = []
    claims: list[Claim] = []

    def measured(self) -> list[Configuration]:
        """The configurations with at least one scenario measured."""
        return [c for c in self.configurations if c.scenarios]

    def scenario_names(self) -> list[str]:
        """Every scenario measured, in the order the configurations first show them."""
        return list(dict.fromkeys(n for c in self.configurations for n in c.scenarios))

    def delta(self, configuration: str, scenario: str, metric: str) -> Delta | None:
        """The row of `metric` of a configuration's scenario against the baseline."""
        for d in self.deltas:
            if d.configuration == configuration and d.scenario == scenario:
                return next((r for r in d.rows if r.component == metric), None)
        return None


class Sweep(msgspec.Struct, kw_only=True):
    """sweep.json. Its `format_version` is always written."""

    format_version: int = FORMAT_VERSION
    profile: str
    target: str
    serve_cmd: str | None = None  # the user's own server command
    varies: list[str] = []
    repeat: int = 1
    notes: dict[str, str] = {}  # by flag: why a knob cannot show its effect here
    moves: dict[str, str] = {}  # by flag: the METRICS key it should move (a plot per knob)
    configurations: list[str] = []
    steps: list[Step] = []
    comparison: SweepComparison | None = None

    @classmethod
    def load(cls, path: Path) -> Sweep:
        """Read sweep.json (versions READS); another version is one CputaxError line."""
        return result_format.load(
            path, cls, READS, "run the sweep again with this cputax (its run directories are kept)"
        )

    def dump(self, path: Path) -> None:
        """Write sweep.json (atomically)."""
        result_format.dump(path, self)
