"""Each request's own server-side phases, joined to its client record, and what they say.

The client sends every request with a join key (X-Request-Id, and the same 32 hex digits
as the trace id of a W3C traceparent). The server's account comes from one of two places:
- its OTLP span (spans.jsonl, client.otlp): arrival (wall clock, converted to the run's
  monotonic clock with the receiver's offset), queue, prefill, decode, TTFT from arrival,
  e2e, tokens; source "otlp". A server on another host stamps arrival on its own wall
  clock: every request bounds that clock's offset (arrival lies between the send and the
  response headers), and the middle of what all requests allow is applied, its half width
  added to the clock error (span_clock);
- the final usage chunk's per-request metrics (record.server, written by the client):
  queue, prefill, decode only; source "response".
A span wins where both exist. From them, per request (ms):
- http_in = arrival - t_sent: client to server and HTTP parse, before vLLM sees it;
- front_end = server TTFT - queue - prefill: chat template, tokenization, IPC to the
  engine, the first token's way back out of it;
- engine_queue, model_prefill, decode: the engine's own;
- stream_out = the client's receive of the last token - the server's last token.
The study's "HTTP overhead" is http_in + front_end + engine_queue, each now measured.

Both ends measure TTFT: the client's (t_sent -> first token received) must equal the
server's TTFT + http_in within 1 ms + 5%, and the client's prefill (headers -> first
token) the engine's queue + prefill likewise. A scenario where they do not is a finding,
with how much and on which side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from cputax.records import read_jsonl
from cputax.results.summary import (
    Agreement,
    Comparison,
    PhaseStats,
    ScenarioServerPhases,
    ScenarioSummary,
    ServerMeans,
    ServerMetrics,
    ServerPhasesRun,
    ServerPhaseTimes,
    SpanClock,
)
from cputax.rundir import RunDir
from cputax.servers import get
from cputax.servers.base import Tracing

__all__ = [
    "PHASES",
    "SPLIT",
    "TOLERANCE",
    "Joined",
    "agree",
    "join",
    "read_spans",
    "server_phases",
    "span_clock",
    "span_phases",
]

PHASES = ("http_in", "front_end", "engine_queue", "model_prefill", "decode", "stream_out")
SPLIT = ("http_in", "front_end", "engine_queue")  # the study's "HTTP overhead", measured
TOLERANCE = (1.0, 0.05)  # ms + share of the client's figure: two measures of one interval agree
NEGATIVE_MS = 0.05  # below -this a derived phase is negative beyond the clocks' error
CLOCK_SLACK_NS = 50_000  # stamps of two clocks on one host, each read by its own process
MS = 1e-6


class _Row(msgspec.Struct, gc=False):
    """The fields of a requests.jsonl line the join reads."""

    scenario: str = ""
    ok: bool = False
    request_id: str | None = None
    t_sent: int | None = None
    t_headers: int | None = None
    t_first_token: int | None = None
    t_last_token: int | None = None
    t_headers_kernel: int | None = None
    t_first_token_kernel: int | None = None
    t_last_token_kernel: int | None = None
    output_tokens: int | None = None
    extra: dict[str, Any] = {}
    server: dict[str, Any] | None = None


@dataclass
class Joined:
    """One successful request: its client moments (received ones as decompose takes them:
    the kernel's stamp where there is one), its `server` record and the derived phases."""

    scenario: str
    request_id: str | None
    t_sent: int
    t_headers: int
    t_first_token: int
    t_last_token: int
    server: dict[str, Any] | None = None
    phases: dict[str, float | None] = field(default_factory=dict)
    # the first token arrived in one read with the second (client.sse marks it; older runs:
    # every token in the read of the last): its stamp is that read's, an upper bound (the
    # client fell behind, or the server held the stream back; the client cannot tell
    # which), so its TTFT is not compared
    first_merged: bool = False


def _received(row: _Row, name: str) -> int | None:
    kernel = getattr(row, name + "_kernel")
    return kernel if kernel is not None else getattr(row, name)


def read_spans(run: RunDir, tracing: Tracing) -> list[dict[str, Any]]:
    """The server's request spans the receiver wrote (other spans, e.g. start-up, dropped)."""
    if not run.spans.exists():
        return []
    return [s for s in read_jsonl(run.spans) if s.get("name") == tracing.span_name]


def span_phases(span: dict[str, Any], tracing: Tracing, offset_ns: int) -> dict[str, Any]:
    """record.server from a span: its attributes in ms, arrival on the monotonic clock."""
    attributes = span.get("attributes") or {}
    out: dict[str, Any] = {"arrival_ns": int(span["start_unix_ns"]) - offset_ns}
    for name, key in tracing.attributes.items():
        value = attributes.get(key)
        if name.endswith("_ms"):
            out[name] = float(value) * 1000.0 if isinstance(value, (int, float)) else None
        else:
            out[name] = value
    out["source"] = "otlp"
    return out


def _key(span: dict[str, Any], tracing: Tracing, ids: dict[str, int]) -> int | None:
    """The record a span belongs to: its trace id is the request id cputax sent; failing
    that (a proxy that starts its own trace), the request id attribute without the
    server's prefix ("chatcmpl-")."""
    index = ids.get(span.get("trace_id") or "")
    if index is None:
        rid = str((span.get("attributes") or {}).get(tracing.request_id_attribute) or "")
        index = ids.get(rid.split("-", 1)[-1])
    return index


def derive(row: Joined) -> dict[str, float | None]:
    """The phases of one request with a server record (ms); None where its source lacks them."""
    s = row.server or {}

    def get_ms(name: str) -> float | None:
        value = s.get(name)
        return float(value) if isinstance(value, (int, float)) else None

    queue, prefill, decode, ttft, e2e = (
        get_ms(n) for n in ("queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "e2e_ms")
    )
    arrival = s.get("arrival_ns")
    out: dict[str, float | None] = dict.fromkeys(PHASES)
    out.update(engine_queue=queue, model_prefill=prefill, decode=decode)
    if arrival is not None:
        out["http_in"] = (arrival - row.t_sent) * MS
        if e2e is not None:
            out["stream_out"] = (row.t_last_token - arrival) * MS - e2e
    if ttft is not None and queue is not None and prefill is not None:
        out["front_end"] = ttft - queue - prefill
    out["client_ttft"] = None if row.first_merged else (row.t_first_token - row.t_sent) * MS
    out["server_ttft_in"] = (
        None if ttft is None or out["http_in"] is None else ttft + out["http_in"]
    )
    out["client_prefill"] = None if row.first_merged else (row.t_first_token - row.t_headers) * MS
    out["server_prefill"] = None if queue is None or prefill is None else queue + prefill
    return out


def join(
    run: RunDir, tracing: Tracing, offset_ns: int
) -> tuple[list[Joined], list[dict[str, Any]]]:
    """Every successful record with its server record (the span's, else the response's) and
    derived phases, and the spans that matched no record (with their arrival)."""
    decode = msgspec.json.Decoder(_Row).decode
    joined: list[Joined] = []
    if run.requests.exists():
        with run.requests.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = decode(line)
                except msgspec.DecodeError:
                    continue  # a torn last line (records.read_jsonl judges bad ones)
                moments = [
                    row.t_sent,
                    _received(row, "t_headers"),
                    _received(row, "t_first_token"),
                    _received(row, "t_last_token"),
                ]
                if not row.ok or any(m is None for m in moments):
                    continue
                merged = bool(row.extra.get("first_token_shared")) or (
                    moments[2] == moments[3] and (row.output_tokens or 0) > 1
                )
                joined.append(
                    Joined(
                        row.scenario,
                        row.request_id,
                        *moments,
                        server=row.server,
                        first_merged=merged,
                    )
                )
    ids = {j.request_id: i for i, j in enumerate(joined) if j.request_id}
    unmatched = []
    for span in read_spans(run, tracing):
        index = _key(span, tracing, ids)
        if index is None:
            unmatched.append({"arrival_ns": int(span["start_unix_ns"]) - offset_ns})
        else:
            joined[index].server = span_phases(span, tracing, offset_ns)
    for row in joined:
        row.phases = derive(row) if row.server else {}
    return joined, unmatched


def agree(client: float, server: float) -> bool:
    """Two measures of one interval agree: within 1 ms + 5% of the client's."""
    return abs(client - server) <= TOLERANCE[0] + TOLERANCE[1] * abs(client)


def _stats(values: list[float]) -> PhaseStats | None:
    if not values:
        return None
    v = np.asarray(values)
    return PhaseStats(
        n=len(v),
        mean=float(v.mean()),
        p50=float(np.percentile(v, 50)),
        p99=float(np.percentile(v, 99)),
        min=float(v.min()),
    )


def _comparison(
    rows: list[Joined], client: str, server: str, what: str, where: str
) -> Comparison | None:
    """Client vs server figure of one interval over a scenario: p50 of each, the p50 of the
    per-request differences and whether it is within the tolerance of the client's p50, the
    share of requests that agree one by one."""
    pairs = [
        (r.phases[client], r.phases[server])
        for r in rows
        if r.phases.get(client) is not None and r.phases.get(server) is not None
    ]
    if not pairs:
        return None
    c, s = np.asarray(pairs).T
    c50, s50 = float(np.percentile(c, 50)), float(np.percentile(s, 50))
    d50 = float(np.percentile(c - s, 50))
    ok = agree(c50, c50 - d50)
    finding = None
    if not ok:
        side = "the client's is longer" if d50 > 0 else "the server's is longer"
        finding = (
            f"{what}: client p50 {c50:.2f} ms vs server p50 {s50:.2f} ms, per request "
            f"{d50:+.2f} ms at p50 ({d50 / c50 * 100 if c50 else float('nan'):+.0f}% of the "
            f"client's); {side}: {where}"
        )
    return Comparison(
        client_p50_ms=c50,
        server_p50_ms=s50,
        diff_p50_ms=d50,
        tolerance_ms=TOLERANCE[0] + TOLERANCE[1] * abs(c50),
        agree=ok,
        requests_agreeing=float(np.mean([agree(a, b) for a, b in pairs])),
        n=len(pairs),
        finding=finding,
    )


TTFT_WHERE = (
    "the difference lies between the server's first token and the client's receive of it "
    "(the server's SSE output path, the network, the client)"
)
PREFILL_WHERE = (
    "the difference is front-end work after the response headers: the request's way "
    "into the engine and the first token's way out, not the engine's own time"
)


def summarize(
    rows: list[Joined], unmatched: int, prometheus: ServerMetrics | None
) -> ScenarioServerPhases:
    """One scenario's server phases: coverage, the phases' p50/p99/mean, negatives, the two
    agreements, and the per-request means beside the Prometheus means of the same scenario."""
    served = [r for r in rows if r.server]
    sources: dict[str, int] = {}
    for r in served:
        sources[r.server["source"]] = sources.get(r.server["source"], 0) + 1
    phases = ServerPhaseTimes(
        **{p: _stats([r.phases[p] for r in served if r.phases.get(p) is not None]) for p in PHASES}
    )
    negative = {
        p: sum(1 for r in served if (r.phases.get(p) or 0.0) < -NEGATIVE_MS) for p in PHASES
    }
    means = {}
    for key, name in (
        ("queue", "queue_ms"),
        ("prefill", "prefill_ms"),
        ("decode", "decode_ms"),
        ("ttft", "ttft_ms"),
        ("e2e", "e2e_ms"),
    ):
        values = [r.server[name] for r in served if r.server.get(name) is not None]
        means[key] = float(np.mean(values)) if values else None
    prom = prometheus.mean_ms if prometheus is not None else {}
    return ScenarioServerPhases(
        records=len(rows),
        with_server=len(served),
        coverage=len(served) / len(rows) if rows else None,
        sources=sources,
        first_token_merged=sum(1 for r in rows if r.first_merged),
        records_without_span=sum(
            1 for r in rows if not r.server or r.server.get("source") != "otlp"
        ),
        spans_without_record=unmatched,
        phases_ms=phases,
        negative={p: n for p, n in negative.items() if n},
        agreement=Agreement(
            ttft=_comparison(
                served,
                "client_ttft",
                "server_ttft_in",
                "TTFT (client vs server TTFT + HTTP in)",
                TTFT_WHERE,
            ),
            prefill=_comparison(
                served,
                "client_prefill",
                "server_prefill",
                "prefill (client headers -> first token vs engine queue + prefill)",
                PREFILL_WHERE,
            ),
        ),
        per_request_mean_ms=ServerMeans(**means),
        prometheus_mean_ms=ServerMeans(**{k: prom.get(k) for k in means}),
    )


def _offset(info: dict[str, Any]) -> tuple[int, int | None]:
    """Wall -> monotonic offset for span times: the receiver's reading, else run.json's pair."""
    clock = ((info.get("monitors") or {}).get("otlp") or {}).get("clock")
    if clock:
        return int(clock["offset_ns"]), int(clock["error_ns"])
    pair = info.get("clock") or {}
    if "time_ns" in pair:
        return int(pair["time_ns"]) - int(pair["monotonic_ns"]), None
    return 0, None


def span_clock(rows: list[Joined], on_this_host: bool) -> SpanClock:
    """The offset (server clock - client clock) the matched spans allow (SpanClock), and the
    one to apply: none on this host (one clock; the bounds are then a check), else the
    middle of the bounds, good to half their width."""
    spans = [
        r
        for r in rows
        if r.server and r.server.get("source") == "otlp" and r.server.get("arrival_ns") is not None
    ]
    if not spans:
        return SpanClock(requests=0, on_this_host=on_this_host)
    lo = max(r.server["arrival_ns"] - r.t_headers for r in spans)  # arrived before the headers
    hi = min(r.server["arrival_ns"] - r.t_sent for r in spans)  # and after the send began
    if on_this_host:  # one clock: an offset of 0 must fit every request
        consistent = lo <= CLOCK_SLACK_NS and hi >= -CLOCK_SLACK_NS
    else:
        consistent = lo <= hi + CLOCK_SLACK_NS
    return SpanClock(
        requests=len(spans),
        lo_ns=lo,
        hi_ns=hi,
        consistent=consistent,
        applied_ns=0 if on_this_host else (lo + hi) // 2,
        on_this_host=on_this_host,
    )


def _clock_finding(clock: SpanClock) -> str | None:
    """One line when the spans cannot all be placed between their request's send and headers."""
    if clock.consistent or clock.lo_ns is None or clock.hi_ns is None:
        return None
    if clock.on_this_host:
        return (
            f"server arrival stamps fall outside [send, headers] by up to "
            f"{max(clock.lo_ns, -clock.hi_ns) / 1e6:.2f} ms on one clock: the server's "
            "stamps or the client's are wrong"
        )
    return (
        f"no one clock offset places every span between its request's send and headers "
        f"(bounds {clock.lo_ns / 1e6:+.2f} > {clock.hi_ns / 1e6:+.2f} ms): the clocks drifted "
        "during the run, or the stamps are wrong; http_in and stream_out are not reliable"
    )


def _tracing(info: dict[str, Any]) -> Tracing | None:
    name = (
        (info.get("server") or {}).get("name") or (info.get("target") or {}).get("server") or "vllm"
    )
    try:
        return get(name).capabilities.tracing
    except KeyError:
        return None


def server_phases(
    run: RunDir, info: dict[str, Any], scenarios: list[ScenarioSummary]
) -> tuple[ServerPhasesRun | None, dict[str, ScenarioServerPhases]]:
    """Join the run's records to the server's own accounts and summarize per scenario: the
    run's line (which source, spans received and unmatched, the findings; `note`, one line,
    when the server gave no account of any request) and each scenario's server phases, by
    name. (None, {}) for a server whose table has no such account."""
    tracing = _tracing(info)
    if tracing is None:
        return None, {}
    offset, error = _offset(info)
    rows, unmatched = join(run, tracing, offset)
    # a server elsewhere (run.json's target.local False) stamps spans on its own wall clock
    clock = span_clock(rows, (info.get("target") or {}).get("local", True))
    if clock.applied_ns:
        rows, unmatched = join(run, tracing, offset + clock.applied_ns)
        assert clock.lo_ns is not None and clock.hi_ns is not None
        error = (error or 0) + max(0, clock.hi_ns - clock.lo_ns) // 2
    windows = [w for w in run.read_windows() if not w.get("skipped")]
    by_scenario: dict[str, list[Joined]] = {}
    for r in rows:
        by_scenario.setdefault(r.scenario, []).append(r)
    stray: dict[str, int] = {}
    outside = 0
    for span in unmatched:
        w = next((w for w in windows if w["start_ns"] <= span["arrival_ns"] <= w["end_ns"]), None)
        if w is None:
            outside += 1  # warm-up requests, probes, other clients between scenarios
        else:
            stray[w["scenario"]] = stray.get(w["scenario"], 0) + 1
    findings = [line] if (line := _clock_finding(clock)) else []
    served = 0
    per_scenario = {}
    for scenario in scenarios:
        mine = by_scenario.get(scenario.name, [])
        summary = summarize(mine, stray.get(scenario.name, 0), scenario.server)
        per_scenario[scenario.name] = summary
        served += summary.with_server
        for check in (summary.agreement.ttft, summary.agreement.prefill):
            if check and check.finding:
                findings.append(f"{scenario.name}: {check.finding}")
        for phase, n in summary.negative.items():
            findings.append(
                f"{scenario.name}: {phase} negative in {n} request(s): the two ends' clocks "
                f"or the server's stamps disagree"
            )
    sources = sorted({r.server["source"] for r in rows if r.server})
    matched = sum(1 for r in rows if r.server and r.server["source"] == "otlp")
    note = None
    if not served:
        note = (
            "the server gave no per-request account (no spans, no per-request metrics): start vLLM "
            f"with {tracing.traces_flag} (cputax run --otlp-listen) or {tracing.metrics_flag}"
        )
    return ServerPhasesRun(
        source="+".join(sources) if sources else "none",
        spans_received=matched + len(unmatched),
        spans_matched=matched,
        spans_outside_windows=outside,
        clock_error_ns=error,
        span_clock=clock if clock.requests else None,
        findings=findings,
        note=note,
    ), per_scenario
