"""Each run checks itself: invariants every request record must keep, and the verdict per scenario.

A figure is the server's only if the client's own stalls are not in it. These checks
find the records where they are (issue 17):
- `sent_after_response`: t_sent is later than a receive stamp of the same response
  (the request would read as sent after its answer arrived);
- `negative_phase`: a phase (serialize, HTTP overhead, prefill, decode, total) below zero;
- `serialize_unexplained`: serialize (t_start to the write's start, t_sent) is longer than
  the payload build (thread CPU) plus `stall_ms`: the client's loop or thread was elsewhere
  (another request's work, a preemption) while this request waited to go out;
- `client_lag`: the loop read a response's headers or tokens more than `stall_ms` after
  the kernel had them (both clocks: the loop's stamp minus the kernel's);
- `schedule_lag`: an open-loop request started more than `stall_ms` after its intended start;
- `*_p99`: the scenario's p99 of one of the last three is above `p99_ms`: more than 1% of
  its records, and more than one, are beyond it (they are counted).

A scenario with any such record is marked in summary.json (`invariants`, a Verdict), its
CPU% and GPU% are withheld (None, with `withheld` saying why), and the run fails with one line.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Any

import msgspec
import numpy as np

from cputax.records import RequestTable
from cputax.results.summary import ScenarioSummary, ScheduleLag, Verdict, VerdictBounds

__all__ = [
    "CAUSES",
    "Bounds",
    "check",
    "describe",
    "failure_line",
    "schedule_lag",
    "verdict",
    "withhold",
]

MS = 1e-6


@dataclass(frozen=True)
class Bounds:
    """How far records may stray before they break an invariant (ms).

    tolerance_ms covers the kernel stamps' conversion to the monotonic clock (client.wire:
    well under a microsecond) and float rounding. p99_ms is the issue's bar for the p99 of
    the client's own part of serialize, of its read lag and of its schedule lag, per
    scenario; stall_ms is the bar for any single record (a stall that long is a visible
    share of a decode step). A preemption of a few ms on a shared 2-core machine passes
    the first, not a client that is behind.
    """

    tolerance_ms: float = 0.05
    p99_ms: float = 5.0
    stall_ms: float = 20.0


DEFAULT = Bounds()
CAUSES = {
    "sent_after_response": "stamped sent after its response arrived",
    "negative_phase": "a negative phase",
    "serialize_unexplained": "serialize longer than build + {stall_ms:g} ms",
    "client_lag": "the client read its response more than {stall_ms:g} ms after the kernel had it",
    "schedule_lag": "started more than {stall_ms:g} ms after its intended (open-loop) start",
    "serialize_p99": "beyond build + {p99_ms:g} ms, and the scenario's p99 is too",
    "client_lag_p99": (
        "read more than {p99_ms:g} ms after the kernel had it, and the scenario's p99 is too"
    ),
    "schedule_lag_p99": "started more than {p99_ms:g} ms late, and the scenario's p99 is too",
}
RECEIVED = ("t_headers", "t_first_data", "t_first_token", "t_last_token", "t_end")
KERNEL = ("t_headers", "t_first_data", "t_first_token", "t_last_token")


def _gt(a: np.ndarray, b: np.ndarray | float) -> np.ndarray:
    """a > b where both are known (NaN: not recorded, never a violation)."""
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(a, nan=-np.inf) > np.nan_to_num(b, nan=np.inf)


def _excess(table: RequestTable) -> dict[str, np.ndarray]:
    """Per record (ms, NaN where not recorded): serialize beyond the build, the loop's
    worst lag behind the kernel's stamps, and the start's lag behind the schedule."""
    # t_sent is when the write began (client.stream): the write itself is not in serialize
    serialize = (table["t_sent"] - table["t_start"]) * MS - table["build_s"] * 1e3
    lags = np.stack([(table[name] - table[name + "_kernel"]) * MS for name in KERNEL])
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: no kernel stamps
        lag = np.nanmax(lags, axis=0) if len(table) else np.empty(0)
    return {
        "serialize": serialize,
        "client_lag": lag,
        "schedule_lag": (table["t_start"] - table["t_intended"]) * MS,
    }


def check(table: RequestTable, bounds: Bounds = DEFAULT) -> dict[str, np.ndarray]:
    """Per cause, which rows break it on their own (a boolean mask over the table's rows)."""
    tol = bounds.tolerance_ms / MS
    n = len(table)
    start, sent = table["t_start"], table["t_sent"]
    after = np.zeros(n, dtype=bool)
    for name in RECEIVED:
        after |= _gt(sent, table[name] + tol)
    for name in KERNEL:
        after |= _gt(sent, table[name + "_kernel"] + tol)
    negative = np.zeros(n, dtype=bool)
    ok = table.ok
    moments = [
        start,
        sent,
        *(_received(table, name) for name in ("t_headers", "t_first_token", "t_last_token")),
        table["t_end"],
    ]
    for earlier, later in zip(moments, moments[1:], strict=False):
        negative |= ok & _gt(earlier, later + tol)
    excess = _excess(table)
    return {
        "sent_after_response": after,
        "negative_phase": negative,
        "serialize_unexplained": _gt(excess["serialize"], bounds.stall_ms),
        "client_lag": _gt(excess["client_lag"], bounds.stall_ms),
        "schedule_lag": _gt(excess["schedule_lag"], bounds.stall_ms),
    }


def _p99_breaks(table: RequestTable, bounds: Bounds) -> dict[str, np.ndarray]:
    """Per scenario-level cause, the records beyond p99_ms, where more than 1% of them are
    (and more than one: in a scenario of 20 requests the p99 is its worst one)."""
    out = {}
    for name, values in _excess(table).items():
        known = int((~np.isnan(values)).sum())
        beyond = _gt(values, bounds.p99_ms)
        if beyond.sum() > max(1, int(0.01 * known)):
            out[f"{name}_p99"] = beyond
    return out


def _received(table: RequestTable, name: str) -> np.ndarray:
    kernel = table[name + "_kernel"]
    return np.where(np.isnan(kernel), table[name], kernel)


def verdict(table: RequestTable, bounds: Bounds = DEFAULT) -> Verdict:
    """A scenario's verdict: rows checked, rows breaking any invariant, count per cause."""
    masks = {**check(table, bounds), **_p99_breaks(table, bounds)}
    bad = np.zeros(len(table), dtype=bool)
    for mask in masks.values():
        bad |= mask
    counts = {cause: int(mask.sum()) for cause, mask in masks.items() if mask.any()}
    return Verdict(
        ok=not counts,
        checked=len(table),
        broken=int(bad.sum()),
        causes=counts,
        bounds=VerdictBounds(**asdict(bounds)),
    )


def describe(verdict: Verdict) -> str:
    """The causes of a broken verdict in words, with counts."""
    bounds = msgspec.structs.asdict(verdict.bounds)
    return "; ".join(
        f"{n} {CAUSES.get(cause, cause).format(**bounds)}" for cause, n in verdict.causes.items()
    )


def withhold(summary: ScenarioSummary, verdict: Verdict) -> ScenarioSummary:
    """The scenario's summary with its verdict; a broken one has its CPU%/GPU% withheld."""
    if verdict.ok:
        return msgspec.structs.replace(summary, invariants=verdict)
    why = (
        f"{verdict.broken} of {verdict.checked} requests break the run's invariants: "
        f"{describe(verdict)}"
    )
    return msgspec.structs.replace(
        summary, invariants=verdict, cpu_pct=None, gpu_pct=None, withheld=why
    )


def failure_line(summary: ScenarioSummary) -> str | None:
    """One line for a scenario whose records break the invariants (None: they keep them)."""
    if not summary.withheld:
        return None
    return f"{summary.name}: {summary.withheld}; its CPU% is withheld"


def schedule_lag(table: RequestTable) -> ScheduleLag | None:
    """Open-loop requests: the schedule lag (t_start - t_intended) and latency from the intended
    start (coordinated omission: the client's own lateness stays in the figure). None for a
    closed-loop scenario."""
    intended = table["t_intended"]
    known = ~np.isnan(intended)
    if not known.any():
        return None
    lag = (table["t_start"][known] - intended[known]) * MS
    out: dict[str, Any] = {
        "requests": int(known.sum()),
        "p50": float(np.percentile(lag, 50)),
        "p99": float(np.percentile(lag, 99)),
        "max": float(lag.max()),
    }
    done = known & table.ok
    for name, column in (("ttft", _received(table, "t_first_token")), ("total", table["t_end"])):
        values = (column[done] - intended[done]) * MS
        values = values[~np.isnan(values)]
        if len(values):
            out[f"{name}_from_intended_p50"] = float(np.percentile(values, 50))
            out[f"{name}_from_intended_p99"] = float(np.percentile(values, 99))
    return ScheduleLag(**out)
