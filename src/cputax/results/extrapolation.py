"""extrapolation.json as a typed result: `cputax extrapolate`'s fit of the front end and its
users x sub-agents table (analysis.extrapolate builds it, report.extrapolation renders it)."""

from __future__ import annotations

import msgspec

__all__ = [
    "Extrapolation",
    "FitPoint",
    "FrontEndModel",
    "FrontEndParams",
    "LeaveOneOut",
    "TableRow",
]


class FrontEndParams(msgspec.Struct, kw_only=True):
    L_ms: float  # the model's L (ms): the JSON field keeps its name
    s0_ms: float
    s1_us_per_token: float
    q: float
    service_ms_at_context: float
    proportional_to_tokens: bool


class LeaveOneOut(msgspec.Struct, kw_only=True):
    """The leave-one-out RMS error (%) of each model; None: too few scenarios."""

    queue: float | None = None
    queue_contention: float | None = None


class FrontEndModel(msgspec.Struct, kw_only=True):
    name: str
    formula: str
    params: FrontEndParams
    fit_rms_pct: float
    fit_max_pct: float
    loo_rms_pct: LeaveOneOut
    alternative_q: float


class FitPoint(msgspec.Struct, kw_only=True):
    """A measured scenario beside the model's figures for it."""

    name: str
    concurrency: int
    prompt_tokens: float
    http_overhead_ms: float
    fitted_ms: float
    cpu_pct: float
    fitted_cpu_pct: float


class TableRow(msgspec.Struct, kw_only=True):
    users: int
    subagents: int
    concurrency: int
    http_overhead_ms: float
    cpu_pct: float
    measured_range: bool  # within the largest measured concurrency
    beyond: bool  # past analysis.extrapolate.BEYOND times it: a warning


class Extrapolation(msgspec.Struct, kw_only=True):
    """extrapolation.json (written by `cputax extrapolate`, never read back by cputax)."""

    format_version: int = 1
    model: FrontEndModel
    client_ms: str
    rest_ms: str
    cpu_fit_rms_points: float | None
    points: list[FitPoint]
    context_tokens: int
    max_measured_concurrency: int
    table: list[TableRow]
    warnings: list[str] = []
    left_out: list[str] = []  # scenarios the fit could not use, and why
