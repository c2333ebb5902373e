"""whatif.json as a typed result: what a slowdown experiment found, per component and
scenario, with the placebo, the back-tests and the study's claims.

analysis.whatif builds a WhatIf whole, judgments included (a fit's linearity, a back-test
holding, the placebo within noise, each claim's verdict); report.whatif renders its fields.

Format versions:
- 1: info, slowdown, results, placebo, claims, notes (untyped dicts, same field names).
- 2: the same fields typed; adds `placebo_clean` on the top level and `verdict` per claim.
  A version-1 file still reads when its fields fit: the added fields are then None.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from cputax.results import format as result_format
from cputax.results.metric import Metric

__all__ = [
    "FORMAT_VERSION",
    "METRICS",
    "READS",
    "REBUILD",
    "Backtest",
    "Claim",
    "ClaimEffect",
    "Effect",
    "Fit",
    "Info",
    "Metric",
    "MetricResult",
    "Placebo",
    "PlaceboEffect",
    "Point",
    "Result",
    "ServerStart",
    "Slowdown",
    "Verdict",
    "WhatIf",
]

FORMAT_VERSION = 2
READS = (1, 2)  # version 1: the same field names, untyped; its claims have no verdict
REBUILD = "rerun the experiment with `cputax whatif` (same options) to make a current one"


# The metrics every point measures, fitted against the added time (names as in whatif.json)
METRICS: dict[str, Metric] = {
    "throughput": Metric("output tokens/s", "tok/s", True),
    "ttft_p50": Metric("TTFT p50", "ms", False),
    "ttft_p99": Metric("TTFT p99", "ms", False),
    "itl_p50": Metric("ITL p50", "ms", False),
    "itl_p99": Metric("ITL p99", "ms", False),
    "e2e_p50": Metric("e2e p50", "ms", False),
    "e2e_p99": Metric("e2e p99", "ms", False),
}


class Verdict:
    """What a claim row concluded (Claim.verdict), as written to whatif.json."""

    NOT_A_SLOWDOWN = "not_a_slowdown"  # the GPU claim: measured with --gpu-speed, not here
    NOT_MEASURED = "not_measured"  # its component was not slowed in this experiment
    NO_CONCLUSION = "no_conclusion"  # the placebo moved: nothing is concluded
    NOTHING_MEASURABLE = "nothing_measurable"  # the interval includes zero
    IMPROVES = "improves"  # the interval is clear of zero, a gain
    WORSENS = "worsens"  # the interval is clear of zero, a loss


class ServerStart(msgspec.Struct, kw_only=True):
    command: list[str] = []
    startup_s: float | None = None


class Info(msgspec.Struct, kw_only=True):
    """The experiment as planned (plan.json without its points)."""

    profile: str | None = None
    scenarios: list[str] = []
    target: str | None = None
    serve_cmd: str | None = None
    components: list[str] = []  # "a" or "a+b" (slowed together)
    placebo: str | None = None  # the placebo component, None when none was run
    slowdowns: list[float] = []
    repeat: int | None = None
    cpu_model: str | None = None
    gpu: str | None = None
    gpu_speed: float | None = None
    server: ServerStart | None = None


class Slowdown(msgspec.Struct, kw_only=True):
    """The time the slowdown added against what it was asked (k x d), all windows (ms)."""

    added_ms: float
    target_ms: float
    error_pct: float | None = None


class Fit(msgspec.Struct, kw_only=True):
    """A metric against the added time per request (ms): y = intercept + slope * x, with the
    slope's 95% interval; `curvature_t` is the t value of a quadratic term (None: fewer than
    three slowdowns), `linear` False when that term is significant (analysis decides)."""

    slope: float
    slope_lo: float
    slope_hi: float
    intercept: float
    points: int
    r2: float | None
    curvature_t: float | None = None
    linear: bool | None = None


class Effect(msgspec.Struct, kw_only=True):
    """A predicted change of a metric (its unit) and in % of the unslowed value, with 95%
    intervals."""

    value: float
    lo: float
    hi: float
    pct: float | None
    pct_lo: float | None
    pct_hi: float | None


class Backtest(msgspec.Struct, kw_only=True):
    """The unslowed value predicted from the slowed points alone against the measured one."""

    predicted: float
    measured: float
    error: float
    error_pct: float | None
    half_width: float  # the prediction's 95% half-width
    holds: bool


class MetricResult(msgspec.Struct, kw_only=True):
    base: float | None  # the unslowed value
    fit: Fit
    faster_2x: Effect
    free: Effect
    backtest: Backtest | None = None


class Point(msgspec.Struct, kw_only=True):
    """One slowdown k of a component, averaged over its runs (per request, ms)."""

    added_ms: float
    own_ms: float
    calls: float
    runs: int


class Result(msgspec.Struct, kw_only=True):
    """One component in one scenario."""

    component: str
    scenario: str
    own_ms_per_request: float
    points: dict[str, Point]  # str(k) -> the point
    metrics: dict[str, MetricResult]  # METRICS key -> its fit and effects
    nonlinear: list[str] = []  # the metrics whose fit is not linear


class PlaceboEffect(msgspec.Struct, kw_only=True):
    value: float
    lo: float
    hi: float
    zero_inside: bool


class Placebo(msgspec.Struct, kw_only=True):
    """The placebo's effect at the largest slowdown, per metric, in one scenario."""

    added_ms: float
    effects: dict[str, PlaceboEffect]
    within_noise: bool


class ClaimEffect(msgspec.Struct, kw_only=True):
    """The component being free, as a gain: positive is better, whatever the metric."""

    pct: float | None
    pct_lo: float | None
    pct_hi: float | None
    ms: float


class Claim(msgspec.Struct, kw_only=True):
    """One study claim in one scenario: the measured effect and what it means."""

    claim: str
    scenario: str
    component: str
    metric: str
    effect: ClaimEffect | None
    sentence: str
    verdict: str | None = None  # a Verdict; None in a version-1 file


class WhatIf(msgspec.Struct, kw_only=True):
    """whatif.json. Its `format_version` is always written."""

    format_version: int = FORMAT_VERSION
    info: Info = msgspec.field(default_factory=Info)
    slowdown: dict[str, Slowdown] = {}  # component -> added vs asked
    results: list[Result] = []
    placebo: dict[str, Placebo] = {}  # scenario -> the placebo's effects
    placebo_clean: bool | None = None  # every scenario's placebo within noise; None: none run
    claims: list[Claim] = []
    notes: list[str] = []

    @classmethod
    def load(cls, path: Path) -> WhatIf:
        """Read whatif.json (versions READS); another version is one CputaxError line."""
        return result_format.load(path, cls, READS, REBUILD)

    def dump(self, path: Path) -> None:
        """Write whatif.json (atomically)."""
        result_format.dump(path, self)

    def result(self, component: str, scenario: str) -> Result | None:
        """The result of that component in that scenario, or None."""
        return next(
            (r for r in self.results if r.component == component and r.scenario == scenario),
            None,
        )
