"""A scenario's server-side numbers from two Prometheus scrapes (before, after).

Metric names are data: one row per quantity, listing the names it has had across
server versions and servers. Means are delta(_sum) / delta(_count). A metric the
server does not export is None (absent), never zero.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# quantity -> names to try, first found wins (vLLM current, vLLM older, SGLang)
HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "queue": ("vllm:request_queue_time_seconds", "sglang:queue_time_seconds"),
    "prefill": ("vllm:request_prefill_time_seconds",),
    "decode": ("vllm:request_decode_time_seconds",),
    "inference": ("vllm:request_inference_time_seconds",),
    "ttft": ("vllm:time_to_first_token_seconds", "sglang:time_to_first_token_seconds"),
    "e2e": ("vllm:e2e_request_latency_seconds", "sglang:e2e_request_latency_seconds"),
}
COUNTERS: dict[str, tuple[str, ...]] = {
    "prefix_cache_queries": ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total"),
    "prompt_tokens": ("vllm:prompt_tokens_total", "sglang:prompt_tokens_total"),
    "generation_tokens": ("vllm:generation_tokens_total", "sglang:generation_tokens_total"),
    "preemptions": ("vllm:num_preemptions_total",),
    "process_cpu_seconds": ("process_cpu_seconds_total",),
}
GAUGES: dict[str, tuple[str, ...]] = {
    "running": ("vllm:num_requests_running", "sglang:num_running_reqs"),
    "waiting": ("vllm:num_requests_waiting", "sglang:num_queue_reqs"),
    "kv_cache_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
}


def parse_metrics(text: str) -> dict[str, float]:
    """Sample name -> value, summed over label sets (engines, models); buckets dropped."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith(("_bucket", "_created")):
                continue
            values[sample.name] = values.get(sample.name, 0.0) + float(sample.value)
    return values


def _first(values: dict[str, float], names: tuple[str, ...], suffix: str = "") -> float | None:
    for name in names:
        if name + suffix in values:
            return values[name + suffix]
    return None


def _delta(before: dict[str, float], after: dict[str, float], names: tuple[str, ...], suffix: str = "") -> float | None:
    a = _first(after, names, suffix)
    if a is None:
        return None
    return a - (_first(before, names, suffix) or 0.0)


def scenario_server_metrics(
    before: dict[str, float], after: dict[str, float], requests: int, gauge_polls: list[dict[str, float]]
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
        "api_server_cpu_s_per_request": (cpu / requests) if cpu is not None and requests else None,
    }
