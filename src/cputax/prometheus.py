"""Prometheus text (what a server's /metrics answers, and what metrics/*.prom keep) as numbers.

The one reader of that format: the session's gauge polls and the analysis's
before/after deltas both use it.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["parse_metrics"]


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (engines, models); buckets dropped."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values
