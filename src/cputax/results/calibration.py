"""`cputax calibrate`'s results as typed files: the client's accuracy against a timed stub
(Calibration, what `calibrate --json` prints), cputax beside other benchmark clients
(PeersResult, `calibrate --peers --json`) and the machine's ceiling (Ceiling: calibration.json
in the cache dir, which `cputax run` copies into run.json as `client_ceiling`).

peers.calibrate builds them whole; commands.calibrate and analysis read their fields. The
JSON field names are those the dicts before them had. Version 2 adds `format_version`; a
ceiling file without one (version 1) still reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from cputax.results import format as result_format

__all__ = [
    "FORMAT_VERSION",
    "READS",
    "Calibration",
    "Ceiling",
    "Level",
    "PairedRatios",
    "PeerRow",
    "PeerRun",
    "PeerStub",
    "PeersResult",
    "Skipped",
    "StubTimings",
]

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: before format versions; its fields are version 2's


class StubTimings(msgspec.Struct, kw_only=True):
    """The timed stub's delays (ms) and answer length, as calibrate measured against them."""

    headers_delay_ms: float
    first_token_delay_ms: float
    inter_token_delay_ms: float
    output_tokens: int


class PeerStub(StubTimings, kw_only=True):
    """The timed stub's whole configuration (targets.stub.StubConfig), as the peers saw it."""

    model: str
    max_model_len: int
    api_key: str | None
    fault: str | None
    auto_tool_choice: bool
    token_truth: bool


class Level(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One concurrency level: the client's CPU, the ceiling, the errors of its stamps (ms)
    against the stub's truth. Only `first_error` is left out when None (no request failed)."""

    concurrency: int
    requests: int
    errors: int
    client_cpu_us_per_chunk: float | None
    parse_cpu_us_per_chunk: float | None
    client_build_cpu_us: float | None
    offered_chunks_per_s: int
    max_chunks_per_s: int
    past_ceiling: bool  # offered above peers.calibrate.CEILING_SHARE of the ceiling
    ttft_error_ms_p50: float | None
    ttft_error_ms_p99: float | None
    ttft_error_kernel_ms_p50: float | None
    ttft_error_kernel_ms_p99: float | None
    itl_error_ms_p99: float | None
    itl_error_kernel_ms_p99: float | None
    headers_error_ms_p50: float | None
    headers_error_ms_p99: float | None
    client_lag_ms_p50: float | None
    client_lag_ms_p99: float | None
    shared_stamps_pct: float | None
    first_error: str | None = None


class Calibration(msgspec.Struct, kw_only=True):
    """`cputax calibrate --json`: every level, and what the numbers stand on."""

    format_version: int = FORMAT_VERSION
    timed_stub: StubTimings
    cpus: int
    kernel_stamps: bool
    clock_conversion_error_us: float
    clock_steps: int
    note: str
    levels: list[Level]


class PeerRun(msgspec.Struct, kw_only=True):
    """One client's one run at one level: its CPU, the errors of the times it reports (ms;
    `stamps` says whose: the kernel's or its loop's), and its ceiling."""

    client: str
    streams: int
    requests: int
    stamps: str  # "kernel" or "loop"
    errors: int
    cpu_us_per_chunk: float | None
    ttft_error_ms_p50: float | None
    ttft_error_ms_p99: float | None
    itl_error_ms_p99: float | None
    ttft_error_loop_ms_p99: float | None
    itl_error_loop_ms_p99: float | None
    max_chunks_per_s: float


class PairedRatios(msgspec.Struct, kw_only=True):
    """A client's figures over cputax's, repeat by repeat: the median ratio (None: no repeat
    where both had the figure), and for the CPU the range over repeats."""

    cpu_us_per_chunk: float | None
    cpu_us_per_chunk_range: list[float] | None
    ttft_error_ms_p99: float | None
    itl_error_ms_p99: float | None
    max_chunks_per_s: float | None


class PeerRow(PeerRun, kw_only=True, omit_defaults=True):
    """A client at a level over its repeats: each figure the median, the errors summed, the
    CPU's range; `vs_cputax` (left out for cputax itself) its ratios to cputax's."""

    runs: int
    cpu_us_per_chunk_range: list[float] | None
    vs_cputax: PairedRatios | None = None


class Skipped(msgspec.Struct, kw_only=True):
    client: str
    why: str


class PeersResult(msgspec.Struct, kw_only=True):
    """`cputax calibrate --peers --json`: a row per client and level, the clients that could
    not run here, and the machine."""

    format_version: int = FORMAT_VERSION
    peers: list[PeerRow]
    skipped: list[Skipped]
    cpus: int
    cpu_model: str  # "" when unknown
    repeat: int
    timed_stub: PeerStub
    note: str


class Ceiling(msgspec.Struct, kw_only=True):
    """The most chunks/s client and stub took in together on this machine, and the share of
    it past which a run measures the client falling behind. calibration.json in the cache
    dir, and run.json's `client_ceiling`."""

    format_version: int = FORMAT_VERSION
    max_chunks_per_s: int
    share: float
    cpus: int | None = None
    cpu_model: str | None = None
    measured_at: str | None = None  # UTC, ISO 8601

    @classmethod
    def load(cls, path: Path) -> Ceiling:
        """Read calibration.json (versions READS); another version is one CputaxError line."""
        return result_format.load(
            path, cls, READS, "run `cputax calibrate` to measure the ceiling again"
        )

    def dump(self, path: Path) -> None:
        """Write calibration.json (atomically)."""
        result_format.dump(path, self)

    @classmethod
    def of_run(cls, info: dict[str, Any]) -> Ceiling | None:
        """run.json's copy (`client_ceiling`); None when the run had none, or one that does
        not fit (then there is no ceiling to judge by)."""
        value = info.get("client_ceiling")
        if not value:
            return None
        try:
            return msgspec.convert(value, cls)
        except msgspec.ValidationError:
            return None
