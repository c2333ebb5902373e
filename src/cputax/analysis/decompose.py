"""Split every request into the study's phases and summarize them per scenario.

Phases (ms), named as the study named them but measured at the boundaries vLLM
really has (see the README):
- serialize = t_sent - t_start: payload build + JSON encode + the client's wait to write
- http_overhead = t_headers - t_sent: the server front end (HTTP parse, chat template,
  tokenization, event-loop waits); vLLM sends headers before the engine sees the request
- prefill = t_first_token - t_headers: engine queue + prefill + first sample + detokenize
- decode = t_last_token - t_first_token
- response_parse = client CPU spent parsing the stream
- total = t_end - t_start
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from cputax.records import RequestRecord
from cputax.util import percentile

PHASES = ("serialize", "http_overhead", "prefill", "decode", "response_parse", "total")
CPU_PHASES = ("serialize", "http_overhead", "response_parse")
GPU_PHASES = ("prefill", "decode")
PROMPT_TOLERANCE = 0.02  # flag a scenario whose prompts are more than 2% off target


def phases_ms(r: RequestRecord) -> dict[str, float] | None:
    """A finished request's phases, or None when it did not complete."""
    if not r.ok or None in (r.t_sent, r.t_headers, r.t_first_token, r.t_last_token, r.t_end):
        return None
    ms = 1e-6
    return {
        "serialize": (r.t_sent - r.t_start) * ms,
        "http_overhead": (r.t_headers - r.t_sent) * ms,
        "prefill": (r.t_first_token - r.t_headers) * ms,
        "decode": (r.t_last_token - r.t_first_token) * ms,
        "response_parse": r.parse_s * 1000.0,
        "total": (r.t_end - r.t_start) * ms,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _stat(rows: list[dict[str, float]], fn) -> dict[str, float | None]:
    return {p: (fn([row[p] for row in rows]) if rows else None) for p in PHASES}


def _error_kind(error: str | None) -> str:
    text = (error or "unknown").split(":", 1)[0]
    return text[:60]


def summarize_scenario(
    scenario: dict[str, Any],
    records: Iterable[RequestRecord],
    window: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary.json entry of one scenario (`scenario` is the profile's scenario as a dict)."""
    records = list(records)
    rows = [p for r in records if (p := phases_ms(r)) is not None]
    ok = [r for r in records if r.ok]
    mean = _stat(rows, _mean)
    cpu = sum(mean[p] for p in CPU_PHASES) if rows else None
    gpu = sum(mean[p] for p in GPU_PHASES) if rows else None
    total = mean["total"]
    prompt = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    output = [r.output_tokens for r in ok if r.output_tokens is not None]
    target = scenario.get("context_tokens")
    prompt_mean = _mean(prompt)
    off = (prompt_mean - target) / target if prompt_mean is not None and target else None
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            kind = _error_kind(r.error)
            errors[kind] = errors.get(kind, 0) + 1
    summary: dict[str, Any] = {
        "name": scenario["name"],
        "concurrency": scenario.get("concurrency"),
        "context_tokens": target,
        "requests": len(records),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "prompt_tokens_mean": prompt_mean,
        "prompt_tokens_off_pct": None if off is None else 100.0 * off,
        "prompt_tokens_flagged": off is not None and abs(off) > PROMPT_TOLERANCE,
        "output_tokens_mean": _mean(output),
        "output_tokens_source": sorted({r.output_tokens_source for r in ok if r.output_tokens_source}),
        "mean_ms": mean,
        "p50_ms": _stat(rows, lambda v: percentile(v, 50)),
        "p99_ms": _stat(rows, lambda v: percentile(v, 99)),
        "client_cpu_ms": {
            "build": _mean([r.build_s * 1000.0 for r in ok]),
            "parse_per_chunk_us": _mean([r.parse_s * 1e6 / r.chunks for r in ok if r.chunks]),
        },
        "cpu_pct": None if not total else 100.0 * cpu / total,
        "gpu_pct": None if not total else 100.0 * gpu / total,
        "server": server,
    }
    if window:
        wall = (window["end_ns"] - window["start_ns"]) / 1e9
        summary["wall_s"] = wall
        summary["throughput"] = {
            "requests_per_s": len(ok) / wall if wall > 0 else None,
            "output_tokens_per_s": sum(output) / wall if wall > 0 else None,
        }
        summary["achieved_concurrency"] = _achieved_concurrency(ok, window)
    return summary


def _achieved_concurrency(records: list[RequestRecord], window: dict[str, Any]) -> float | None:
    """Mean requests in flight over the window: target vs achieved, as peers' users ask."""
    wall = window["end_ns"] - window["start_ns"]
    if wall <= 0:
        return None
    busy = sum((r.t_end or r.t_start) - r.t_start for r in records)
    return busy / wall


def http_overhead_growth(scenarios: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """http_overhead by concurrency for each context size, relative to the lowest concurrency."""
    by_ctx: dict[int, list[dict[str, Any]]] = {}
    for s in scenarios:
        if s["mean_ms"]["http_overhead"] is not None:
            by_ctx.setdefault(s["context_tokens"], []).append(s)
    rows = []
    for ctx, group in sorted(by_ctx.items()):
        if len({s["concurrency"] for s in group}) < 2:
            continue  # growth needs two concurrency levels at one context size
        group.sort(key=lambda s: s["concurrency"])
        base = group[0]["mean_ms"]["http_overhead"]
        for s in group:
            oh = s["mean_ms"]["http_overhead"]
            rows.append({
                "context_tokens": ctx, "concurrency": s["concurrency"], "scenario": s["name"],
                "http_overhead_ms": oh, "p99_ms": s["p99_ms"]["http_overhead"],
                "growth": oh / base if base else None,
            })
    return rows
