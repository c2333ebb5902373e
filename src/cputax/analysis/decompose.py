"""Split every request into the study's phases and summarize them per scenario.

Phases (ms), named as the study named them but measured at the boundaries vLLM
really has (see docs/phases-and-clocks.md):
- serialize = t_sent - t_start: payload build + JSON encode + the client's wait to write
- http_overhead = t_headers - t_sent: the server front end (HTTP parse, chat template,
  tokenization, event-loop waits); vLLM sends headers before the engine sees the request
- prefill = t_first_token - t_headers: engine queue + prefill + first sample + detokenize
- decode = t_last_token - t_first_token
- response_parse = client time spent parsing the stream
- total = t_end - t_start

Received moments (headers, first and last token) are the kernel's receive stamps where
the client had them (`clock` says which), the client loop's otherwise; the gap between
the two is the client's own lag, shown beside the phases (`client_lag_ms`). Everything
is computed on the columns of a RequestTable, so a million requests take a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cputax.records import RequestTable
from cputax.results.summary import (
    ClientCpu,
    ClientLag,
    GrowthRow,
    PhaseTimes,
    ScenarioSummary,
    ServerMetrics,
    Throughput,
)
from cputax.util import average, percentile

__all__ = [
    "CPU_PHASES",
    "GPU_PHASES",
    "PHASES",
    "completed",
    "http_overhead_growth",
    "percentile",
    "phases",
    "received",
    "summarize_scenario",
]

PHASES = ("serialize", "http_overhead", "prefill", "decode", "response_parse", "total")
CPU_PHASES = ("serialize", "http_overhead", "response_parse")
GPU_PHASES = ("prefill", "decode")
PROMPT_TOLERANCE = 0.02  # flag a scenario whose prompts are more than 2% off target
RECEIVED = ("t_headers", "t_first_token", "t_last_token")
MS = 1e-6


def received(table: RequestTable, name: str) -> np.ndarray:
    """A received moment: the kernel's stamp where the read had one, else the loop's."""
    kernel = table[name + "_kernel"]
    return np.where(np.isnan(kernel), table[name], kernel)


def completed(table: RequestTable) -> np.ndarray:
    """The rows that finished with every moment the phases need."""
    mask = table.ok.copy()
    for name in ("t_start", "t_sent", "t_headers", "t_first_token", "t_last_token", "t_end"):
        mask &= ~np.isnan(table[name])
    return mask


def phases(table: RequestTable) -> dict[str, np.ndarray]:
    """Every phase (ms) of the completed rows, in row order."""
    done = completed(table)
    start, sent, end = table["t_start"][done], table["t_sent"][done], table["t_end"][done]
    headers, first, last = (received(table, name)[done] for name in RECEIVED)
    return {
        "serialize": (sent - start) * MS,
        "http_overhead": (headers - sent) * MS,
        "prefill": (first - headers) * MS,
        "decode": (last - first) * MS,
        "response_parse": table["parse_s"][done] * 1000.0,
        "total": (end - start) * MS,
    }


def _stat(values: dict[str, np.ndarray], q: float | None) -> PhaseTimes:
    """Per phase the mean (q None) or the q-th percentile, linear as util.percentile; None
    when empty."""
    out: dict[str, float | None] = {}
    for p in PHASES:
        v = values[p]
        out[p] = None if not len(v) else float(v.mean() if q is None else np.percentile(v, q))
    return PhaseTimes(**out)


def _error_kind(error: str | None) -> str:
    """The error's kind: its text up to the first ": " (a URL's colons are no cut)."""
    text = (error or "unknown").split(": ", 1)[0]
    return text[:60]


def _client_lag(table: RequestTable) -> ClientLag | None:
    """The loop's stamp minus the kernel's at the first and last token (ms): the client's lag."""
    lags = [table[name] - table[name + "_kernel"] for name in ("t_first_token", "t_last_token")]
    lags = [lag[~np.isnan(lag)] * MS for lag in lags]
    if not len(lags[0]):
        return None
    both = np.concatenate(lags)
    return ClientLag(
        p50=float(np.percentile(both, 50)),
        p99=float(np.percentile(both, 99)),
        max=float(both.max()),
        first_token_p99=float(np.percentile(lags[0], 99)),
    )


def _shared_pct(table: RequestTable) -> float | None:
    """Token chunks stamped with a later chunk's read, % of the chunks (None: not recorded)."""
    shared, chunks = table["shared_stamps"][table.ok], table["chunks"][table.ok]
    known = ~np.isnan(shared)
    total = float(chunks[known].sum())
    return 100.0 * float(shared[known].sum()) / total if total else None


def _clock(table: RequestTable, done: np.ndarray) -> str | None:
    kernel = ~np.isnan(table["t_first_token_kernel"][done])
    if not len(kernel):
        return None
    return "kernel" if kernel.all() else "loop" if not kernel.any() else "mixed"


def summarize_scenario(
    scenario: dict[str, Any],
    table: RequestTable,
    window: dict[str, Any] | None = None,
    server: ServerMetrics | None = None,
) -> ScenarioSummary:
    """The summary.json entry of one scenario (`scenario` is the profile's scenario as a
    dict, `table` its requests): the decomposition; analysis.analyse adds the verdict and
    what else needs the whole run with msgspec.structs.replace."""
    values = phases(table)
    done = completed(table)
    rows = int(done.sum())
    ok = table.ok
    mean = _stat(values, None)
    cpu = sum(getattr(mean, p) for p in CPU_PHASES) if rows else None
    gpu = sum(getattr(mean, p) for p in GPU_PHASES) if rows else None
    total = mean.total
    target = scenario.get("context_tokens")
    prompt_mean = average(table["prompt_tokens"][ok])
    off = (prompt_mean - target) / target if prompt_mean is not None and target else None
    errors: dict[str, int] = {}
    for error in table.error[~ok]:
        kind = _error_kind(error)
        errors[kind] = errors.get(kind, 0) + 1
    chunks = table["chunks"][ok]
    output = table["output_tokens"][ok]
    parse_per_chunk = np.divide(
        table["parse_s"][ok] * 1e6, chunks, where=chunks > 0, out=np.full(len(chunks), np.nan)
    )
    wall = throughput = achieved = None
    if window:
        wall = (window["end_ns"] - window["start_ns"]) / 1e9
        produced = float(np.nansum(output))
        throughput = Throughput(
            requests_per_s=int(ok.sum()) / wall if wall > 0 else None,
            output_tokens_per_s=produced / wall if wall > 0 else None,
            chunks_per_s=float(np.nansum(table["chunks"])) / wall if wall > 0 else None,
        )
        achieved = _achieved_concurrency(table, window)
    return ScenarioSummary(
        name=scenario["name"],
        concurrency=scenario.get("concurrency"),
        context_tokens=target,
        requests=len(table),
        errors=int((~ok).sum()),
        error_kinds=errors,
        prompt_tokens_mean=prompt_mean,
        prompt_tokens_off_pct=None if off is None else 100.0 * off,
        prompt_tokens_flagged=off is not None and abs(off) > PROMPT_TOLERANCE,
        output_tokens_mean=average(output),
        output_tokens_source=table.source_names(),
        mean_ms=mean,
        p50_ms=_stat(values, 50),
        p99_ms=_stat(values, 99),
        clock=_clock(table, done),
        client_lag_ms=_client_lag(table),
        shared_stamps_pct=_shared_pct(table),
        client_cpu_ms=ClientCpu(
            build=average(table["build_s"][ok] * 1000.0),
            parse_per_chunk_us=average(parse_per_chunk),
        ),
        cpu_pct=None if not total else 100.0 * cpu / total,
        gpu_pct=None if not total else 100.0 * gpu / total,
        mean_share_pct=_shares(mean),
        server=server,
        wall_s=wall,
        throughput=throughput,
        achieved_concurrency=achieved,
    )


def _shares(mean: PhaseTimes) -> PhaseTimes | None:
    """Each phase's mean as % of the mean total (the report's stacked bars); None without
    a total."""
    total = mean.total
    if not total:
        return None
    return PhaseTimes(
        **{
            k: None if (v := getattr(mean, k)) is None else 100.0 * v / total
            for k in PhaseTimes.__struct_fields__
            if k != "total"
        }
    )


def _achieved_concurrency(table: RequestTable, window: dict[str, Any]) -> float | None:
    """Mean requests in flight over the window: target vs achieved, as peers' users ask."""
    wall = window["end_ns"] - window["start_ns"]
    if wall <= 0:
        return None
    start = table["t_start"][table.ok]
    end = table["t_end"][table.ok]
    return float(np.where(np.isnan(end), 0.0, end - start).sum()) / wall


def http_overhead_growth(scenarios: list[ScenarioSummary]) -> list[GrowthRow]:
    """http_overhead by concurrency for each context size, relative to the lowest concurrency;
    only context sizes measured at two concurrency levels or more."""
    by_ctx: dict[int | None, list[ScenarioSummary]] = {}
    for s in scenarios:
        if s.mean_ms.http_overhead is not None:
            by_ctx.setdefault(s.context_tokens, []).append(s)
    rows = []
    for ctx, group in sorted(by_ctx.items(), key=lambda kv: kv[0] or 0):
        if len({s.concurrency for s in group}) < 2:
            continue  # growth needs two concurrency levels at one context size
        group.sort(key=lambda s: s.concurrency or 0)
        base = group[0].mean_ms.http_overhead
        for s in group:
            oh = s.mean_ms.http_overhead
            assert oh is not None
            rows.append(
                GrowthRow(
                    context_tokens=ctx,
                    concurrency=s.concurrency,
                    scenario=s.name,
                    http_overhead_ms=oh,
                    p99_ms=s.p99_ms.http_overhead,
                    growth=oh / base if base else None,
                )
            )
    return rows
