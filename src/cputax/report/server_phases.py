"""The report's section on each request's own server phases (analysis.server_phases), and
its plot: the study's "HTTP overhead" split into HTTP in, front end and engine queue."""

from __future__ import annotations

from cputax.report.format import fraction, ms, number, table
from cputax.results.summary import (
    PhaseStats,
    ScenarioServerPhases,
    ScenarioSummary,
    SpanClock,
    Summary,
)

__all__ = ["server_phases_section"]

COLUMNS = (
    ("http_in", "HTTP in"),
    ("front_end", "Front end"),
    ("engine_queue", "Engine queue"),
    ("model_prefill", "Model prefill"),
    ("decode", "Decode"),
    ("stream_out", "Stream out"),
)
MEANS = (
    ("queue", "Queue"),
    ("prefill", "Prefill"),
    ("decode", "Decode"),
    ("ttft", "TTFT"),
    ("e2e", "E2E"),
)

NOTES = """\
Each request carries `X-Request-Id` and a W3C `traceparent` (the same 32 hex digits);
the server's span of it (or the final usage chunk's metrics) is joined by that id, so
every phase here is measured per request, at both ends, not left over from a total:

- **HTTP in** = the server's arrival - the client's write: the network and HTTP parsing
  before vLLM sees the request (arrival on the run's monotonic clock).
- **Front end** = the server's TTFT - engine queue - model prefill: chat template,
  tokenization, the way into the engine and the first token's way out.
- **Engine queue**, **model prefill**, **decode**: the engine's own stamps.
- **Stream out** = the client's receive of the last token - the server's last token.

The study's "HTTP overhead" is HTTP in + front end + engine queue (the client's time to
headers, beside it, covers HTTP in and the front end's part before the engine: vLLM sends
headers once the prompt is tokenized). The client's TTFT and
the server's TTFT + HTTP in are two measures of one interval and must agree within
1 ms + 5%; so must the client's prefill (headers -> first token) and the engine's queue +
prefill. Where they do not, the finding says by how much and where the difference lies.
"First token merged" counts requests whose every token came in the read of the last one:
their first-token stamp is only an upper bound (the client fell behind, or the server held
the stream back), so they are left out of both comparisons."""


def _p(stats: PhaseStats | None) -> str:
    return "absent" if not stats else f"{ms(stats.p50)} / {ms(stats.p99)}"


def _split_table(scenarios: list[tuple[ScenarioSummary, ScenarioServerPhases]]) -> str:
    header = ["Scenario", "Conc", "Client HTTP OH p50 / p99"] + [
        f"{label} p50 / p99" for _, label in COLUMNS
    ]
    header += ["With server"]
    rows = []
    for s, sp in scenarios:
        client = f"{ms(s.p50_ms.http_overhead)} / {ms(s.p99_ms.http_overhead)}"
        rows.append(
            [s.name, "" if s.concurrency is None else str(s.concurrency), client]
            + [_p(getattr(sp.phases_ms, key)) for key, _ in COLUMNS]
            + [f"{sp.with_server}/{sp.records} ({fraction(sp.coverage)})"]
        )
    return table(header, rows)


def _agreement_table(scenarios: list[tuple[ScenarioSummary, ScenarioServerPhases]]) -> str:
    header = [
        "Scenario",
        "Client TTFT p50",
        "Server TTFT + HTTP in p50",
        "Diff ms p50 (per request)",
        "Agree",
        "Requests agreeing",
        "Client prefill p50",
        "Engine queue + prefill p50",
        "Diff ms p50 (per request)",
        "Agree",
        "First token merged",
    ]
    rows = []
    for s, sp in scenarios:
        row = [s.name]
        for key in ("ttft", "prefill"):
            a = getattr(sp.agreement, key)
            if a is None:
                row += ["absent"] * (5 if key == "ttft" else 4)
                continue
            row += [
                ms(a.client_p50_ms),
                ms(a.server_p50_ms),
                f"{a.diff_p50_ms:+.2f}",
                "yes" if a.agree else "**no**",
            ]
            if key == "ttft":
                row.append(fraction(a.requests_agreeing))
        rows.append(row + [str(sp.first_token_merged)])
    return table(header, rows)


def _means_table(scenarios: list[tuple[ScenarioSummary, ScenarioServerPhases]]) -> str:
    header = ["Scenario"] + [f"{label} ms per-request / Prometheus" for _, label in MEANS]
    rows = []
    for s, sp in scenarios:
        mine, prom = sp.per_request_mean_ms, sp.prometheus_mean_ms
        rows.append(
            [s.name] + [f"{ms(getattr(mine, k))} / {ms(getattr(prom, k))}" for k, _ in MEANS]
        )
    return table(header, rows)


def _clock_line(clock: SpanClock | None, error_ns: int | None) -> str | None:
    """Which clock the span times were put on, and how well."""
    if clock is None or clock.lo_ns is None or clock.hi_ns is None:
        return None
    bounds = (
        f"the {clock.requests} joined requests bound its offset to "
        f"[{clock.lo_ns / 1e6:+.3f}, {clock.hi_ns / 1e6:+.3f}] ms"
    )
    error = "" if error_ns is None else f"; clock error {error_ns / 1e6:.3f} ms"
    if clock.on_this_host:
        return f"Span clock: the server is on this host (one clock, no offset applied); {bounds}."
    return (
        f"Span clock: the server is on another host; {bounds} (arrival between the send and "
        f"the headers); applied {clock.applied_ns / 1e6:+.3f} ms{error}."
    )


def server_phases_section(summary: Summary) -> str | None:
    """The section, or None when the run has no per-request server account to show."""
    run = summary.server_phases
    if run is None:
        return None
    parts = ["## Server phases per request (the server's own account, joined by request id)", ""]
    if run.note:
        return "\n".join(parts + [f"_{run.note}_", ""])
    scenarios = [
        (s, s.server_phases)
        for s in summary.scenarios
        if s.server_phases is not None and s.server_phases.records
    ]
    parts += [
        f"Source: {run.source}; spans received {number(run.spans_received)}, joined "
        f"{number(run.spans_matched)}; records without a span {run.records_without_span}; "
        f"spans without a record {run.spans_without_record} in the scenarios' windows, "
        f"{run.spans_outside_windows} outside them (warm-up, probes). All ms, p50 / p99.",
        "",
    ]
    if (clock := _clock_line(run.span_clock, run.clock_error_ns)) is not None:
        parts += [clock, ""]
    parts += [
        _split_table(scenarios),
        "",
        "Client and server, side by side:",
        "",
        _agreement_table(scenarios),
        "",
        "Per-request means beside the server's Prometheus means (the same requests; a check "
        "of both):",
        "",
        _means_table(scenarios),
        "",
    ]
    if run.findings:
        parts += ["Findings:", ""] + [f"- {line}" for line in run.findings] + [""]
    parts += [NOTES, ""]
    return "\n".join(parts)
