"""A scenario's server-side numbers from two Prometheus scrapes (before, after).

Metric names are data, in each server's table (cputax.servers): per quantity, the
names it has had across server versions. Means are delta(_sum) / delta(_count). A metric the
server does not export is None (absent), never zero.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cputax.prometheus import parse_metrics
from cputax.rundir import RunDir
from cputax.servers import metric_names

_NAMES = metric_names()  # every server's, vLLM first: a scrape is read with whichever it has
HISTOGRAMS = _NAMES.histograms
COUNTERS = _NAMES.counters
GAUGES = _NAMES.gauges


def _first(values: dict[str, float], names: tuple[str, ...], suffix: str = "") -> float | None:
    for name in names:
        if name + suffix in values:
            return values[name + suffix]
    return None


def _delta(
    before: dict[str, float], after: dict[str, float], names: tuple[str, ...], suffix: str = ""
) -> float | None:
    a = _first(after, names, suffix)
    if a is None:
        return None
    return a - (_first(before, names, suffix) or 0.0)


Busy = tuple[np.ndarray, np.ndarray]  # the requests' sent -> end spans: starts, ends (ns)


def in_flight(polls: list[dict[str, Any]], busy: Busy | None) -> list[dict[str, Any]]:
    """The gauge polls taken while at least one request was in flight (`busy`, ends
    included); all of them when the spans are unknown."""
    if busy is None or not polls:
        return polls
    starts, ends = np.sort(busy[0]), np.sort(busy[1])
    t = np.array([p.get("t_ns", -1) for p in polls], dtype=np.float64)
    # spans open at t: started at or before it, less those that ended before it
    open_ = np.searchsorted(starts, t, side="right") - np.searchsorted(ends, t, side="left")
    return [p for p, n in zip(polls, open_, strict=True) if n > 0]


def scenario_server_metrics(
    before: dict[str, float],
    after: dict[str, float],
    requests: int,
    gauge_polls: list[dict[str, float]],
) -> dict[str, Any]:
    """The server's own view of a scenario: histogram means (ms), cache hit rate, gauges, CPU."""
    means: dict[str, float | None] = {}
    counts: dict[str, float | None] = {}
    for key, names in HISTOGRAMS.items():
        total, count = _delta(before, after, names, "_sum"), _delta(before, after, names, "_count")
        counts[key] = count
        means[key] = None if total is None or not count else 1000.0 * total / count
    deltas = {key: _delta(before, after, names) for key, names in COUNTERS.items()}
    queries, hits = deltas["prefix_cache_queries"], deltas["prefix_cache_hits"]
    gauges: dict[str, dict[str, float] | None] = {}
    for key, names in GAUGES.items():
        seen = [v for poll in gauge_polls if (v := _first(poll, names)) is not None]
        gauges[key] = {"mean": sum(seen) / len(seen), "max": max(seen)} if seen else None
    cpu = deltas["process_cpu_seconds"]
    return {
        "mean_ms": means,
        "histogram_counts": counts,
        "prefix_cache_hit_rate": (hits / queries) if queries and hits is not None else None,
        "counters": deltas,
        "gauges": gauges,
        "gauge_polls": len(gauge_polls),
        "api_server_cpu_s_per_request": (cpu / requests) if cpu is not None and requests else None,
    }


def run_scenario_metrics(
    run: RunDir, name: str, requests: int, busy: Busy | None = None
) -> dict[str, Any] | None:
    """A scenario's server-side numbers from the scrapes a run directory holds; None without
    them. Gauges count only polls taken while requests were in flight (`busy`)."""
    before, after = run.read_scrape(name, "before"), run.read_scrape(name, "after")
    if before is None or after is None:
        return None
    try:
        scrapes = parse_metrics(before), parse_metrics(after)
    except ValueError:  # not Prometheus text (a run from before the client checked its scrapes)
        return None
    every = run.read_gauges(name)
    metrics = scenario_server_metrics(*scrapes, requests, in_flight(every, busy))
    metrics["gauge_polls_total"] = len(every)  # scrapes the server answered during the scenario
    return metrics
