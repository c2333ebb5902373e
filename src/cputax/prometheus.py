"""Prometheus text (what a server's /metrics answers, and what metrics/*.prom keep) as numbers.

The one reader of that format: the session's gauge polls and the analysis's
before/after deltas both use it.
"""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["gauge_values", "parse_metrics"]

# One sample line whose name is not a histogram's or a counter's part: name, value.
_GAUGE = re.compile(
    rb"^([A-Za-z_:][A-Za-z0-9_:]*)(?<!_bucket)(?<!_sum)(?<!_count)(?<!_total)(?<!_created)"
    rb"(?:\{[^}\n]*\})? ([-+0-9.eEaINnf]+)(?: -?[0-9]+)?$",
    re.M,
)


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (engines, models); buckets dropped."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def gauge_values(text: str | bytes) -> dict[str, float]:
    """The gauges of a scrape (no histogram or counter parts), summed over label sets, in
    one C-level scan: polled once a second on the client's event loop while requests
    stream, where prometheus_client's parser of vLLM's ~400 series held the loop for
    milliseconds (reads behind the kernel's stamps, issue 17's checks). {} for what is
    not Prometheus text."""
    data = text.encode() if isinstance(text, str) else text
    values: dict[str, float] = {}
    for name, value in _GAUGE.findall(data):
        try:
            number = float(value)
        except ValueError:
            continue
        key = name.decode()
        values[key] = values.get(key, 0.0) + number
    return values
