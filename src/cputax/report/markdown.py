"""report.md from a run's summary, and the same table for the terminal."""

from __future__ import annotations

from typing import Any

from cputax.report.emulated import emulated_banner
from cputax.report.format import ms, number, pct, ratio_cell, scenario_cell, table
from cputax.results.summary import (
    GaugeStats,
    GrowthRow,
    Interrupted,
    ScenarioSummary,
    Summary,
    Throughput,
)
from cputax.workload.prompts import TOOL_MODES

STUDY_COLUMNS = (
    ("http_overhead", "HTTP OH"),
    ("prefill", "Prefill"),
    ("decode", "Decode"),
    ("total", "Total"),
)
CLIENT_COLUMNS = (("serialize", "Serialize"), ("response_parse", "Parse"))
SERVER_COLUMNS = (
    ("queue", "Queue"),
    ("prefill", "Prefill"),
    ("decode", "Decode"),
    ("ttft", "TTFT"),
    ("e2e", "E2E"),
)

PHASE_NOTES = """\
What each phase contains (boundaries as vLLM really has them):

- **Serialize** (t_start -> request written): the client builds the payload and encodes
  JSON, plus any wait of its event loop before the write. Client CPU.
- **HTTP OH** (written -> response headers): the server's front end. vLLM parses the
  request, renders the chat template and tokenizes the prompt *before* it returns the
  streaming response, and sends headers before the engine has seen the request. So
  this is front-end CPU work plus waits on its event loop (requests queued behind
  other requests' tokenization), not engine scheduling: compare the server's own
  queue time in the server-side table.
- **Prefill** (headers -> first token): the engine's queue, the prefill, the first
  sample and its detokenization. A role-only chunk is not counted as a token.
- **Decode** (first token -> last token): the rest of the generated tokens; it grows
  with max_tokens, so CPU% depends on max_tokens as much as on the server.
- **Parse**: client time spent parsing the stream (the monotonic clock around the parser).
- **Stamps**: the moments received (headers, first and last token) are the kernel's
  receive stamps (SO_TIMESTAMPNS) where the client had them ("kernel"), not the moment
  its event loop got round to the bytes ("loop"); the gap between the two is the
  client's own lag (client table), which the phases above do not carry. A stamp is the
  newest segment's of a read: the kernel merges segments the client has not read yet,
  so a client more than one token behind stamps the earlier tokens with the later one's
  time. "Shared stamps" counts those tokens (a server that writes tokens together
  shows there too); `cputax calibrate` measures the load where they start.
- **CPU% / GPU%**: the study's ratios, (Serialize + HTTP OH + Parse) / Total and
  (Prefill + Decode) / Total, of the means, kept for comparability. They are not a
  measure of CPU-bound time inside the server: prefill and decode include CPU work
  (scheduling, sampling, detokenization) and HTTP OH includes waiting.
"""


def _phase(s: ScenarioSummary, key: str) -> str:
    """mean (p50 / p99)."""
    return (
        f"{ms(getattr(s.mean_ms, key))} ({ms(getattr(s.p50_ms, key))} / "
        f"{ms(getattr(s.p99_ms, key))})"
    )


def _ctx(s: ScenarioSummary) -> str:
    flag = " ⚠" if s.prompt_tokens_flagged else ""
    target = "?" if s.context_tokens is None else f"{s.context_tokens:,}"
    return f"{target} → {number(s.prompt_tokens_mean)}{flag}"


def study_table(scenarios: list[ScenarioSummary]) -> str:
    header = ["Scenario", "Conc", "Ctx (target → actual)"]
    header += [f"{label} ms mean (p50 / p99)" for _, label in STUDY_COLUMNS]
    header += ["CPU%", "GPU%", "Errors"]
    rows = [
        [scenario_cell(s), str(s.concurrency), _ctx(s)]
        + [_phase(s, key) for key, _ in STUDY_COLUMNS]
        + [ratio_cell(s, "cpu_pct"), ratio_cell(s, "gpu_pct"), f"{s.errors}/{s.requests}"]
        for s in scenarios
    ]
    if any(s.gpu_bubble_pct is not None for s in scenarios):  # the emulated GPU: its bubbles
        col = header.index("GPU%") + 1
        header.insert(col, "GPU idle, work pending %")
        for row, s in zip(rows, scenarios, strict=True):
            row.insert(col, pct(s.gpu_bubble_pct))
    return table(header, rows)


def client_table(scenarios: list[ScenarioSummary]) -> str:
    header = ["Scenario"] + [f"{label} ms mean (p50 / p99)" for _, label in CLIENT_COLUMNS]
    header += [
        "build CPU ms",
        "parse µs/chunk",
        "stamps",
        "client lag ms p50 / p99",
        "shared stamps",
        "achieved conc",
        "req/s",
        "output tok/s",
        "schedule lag ms p50 / p99",
    ]
    rows = []
    for s in scenarios:
        thr = s.throughput or Throughput()
        lag = s.client_lag_ms
        rows.append(
            [s.name]
            + [_phase(s, key) for key, _ in CLIENT_COLUMNS]
            + [
                number(s.client_cpu_ms.build, 2),
                number(s.client_cpu_ms.parse_per_chunk_us, 1),
                s.clock or "loop",
                "absent" if lag is None else f"{lag.p50:.2f} / {lag.p99:.2f}",
                pct(s.shared_stamps_pct),
                number(s.achieved_concurrency, 1),
                number(thr.requests_per_s, 2),
                number(thr.output_tokens_per_s, 0),
                _schedule_lag(s),
            ]
        )
    return table(header, rows)


def _schedule_lag(s: ScenarioSummary) -> str:
    """Open loop: how late requests started against their schedule ("-": closed loop)."""
    lag = s.schedule_lag_ms
    return "-" if lag is None else f"{lag.p50:.2f} / {lag.p99:.2f}"


def _gauge(gauge: GaugeStats | None) -> str:
    return "absent" if gauge is None else f"{gauge.mean:.1f} / {gauge.max:.0f}"


def server_table(scenarios: list[ScenarioSummary]) -> str | None:
    with_server = [s for s in scenarios if s.server is not None]
    if not with_server:
        return None
    header = ["Scenario", "Client HTTP OH"] + [f"Server {label} ms" for _, label in SERVER_COLUMNS]
    header += [
        "Client prefill",
        "Prefix hit",
        "Running mean/max",
        "Waiting mean/max",
        "API CPU s/req",
    ]
    rows = []
    for s in with_server:
        srv = s.server
        hit = srv.prefix_cache_hit_rate
        rows.append(
            [s.name, ms(s.mean_ms.http_overhead)]
            + [ms(srv.mean_ms.get(key)) for key, _ in SERVER_COLUMNS]
            + [ms(s.mean_ms.prefill), "absent" if hit is None else f"{100 * hit:.1f}%"]
            + [_gauge(srv.gauges.get(g)) for g in ("running", "waiting")]
            + [number(srv.api_server_cpu_s_per_request, 3)]
        )
    return table(header, rows)


def growth_table(rows: list[GrowthRow]) -> str | None:
    """HTTP overhead against concurrency per context size; analysis
    (decompose.http_overhead_growth) keeps only the sizes measured at two concurrencies."""
    if not rows:
        return None
    return table(
        ["Ctx", "Conc", "Scenario", "HTTP OH ms", "p99 ms", "Growth"],
        [
            [
                number(r.context_tokens),
                str(r.concurrency),
                r.scenario,
                ms(r.http_overhead_ms),
                ms(r.p99_ms),
                "absent" if r.growth is None else f"{r.growth:.1f}x",
            ]
            for r in rows
        ],
    )


def _notes(summary: Summary, info: dict[str, Any]) -> list[str]:
    """The notes: what the target was, what was not measured, and per scenario its failed
    requests and the findings analysis made of it (analysis.findings)."""
    notes = []
    if info.get("target", {}).get("emulated_gpu"):
        notes.append(
            "- The embedded vLLM served an emulated GPU (first lines): its model steps "
            "took modelled time and no CPU, while everything else of vLLM and the client "
            f"shared this machine's {info.get('host', {}).get('cpus', '?')} CPUs."
        )
    elif info.get("target", {}).get("kind") == "embedded":
        cpus = info.get("host", {}).get("cpus", "?")
        notes.append(
            f"- The embedded target ran on this machine's {cpus} CPUs beside the client: "
            'its "GPU" phases are CPU work, and Serialize / Parse include waiting for a '
            "core. It shows the shape of the decomposition, not a GPU server's numbers."
        )
    for skipped in summary.skipped:
        notes.append(f"- **{skipped.name}**: not measured: {skipped.reason}.")
    for s in summary.scenarios:
        notes += [f"- **{s.name}**: {f.text}." for f in summary.findings if f.scenario == s.name]
        if s.errors:
            kinds = ", ".join(f"{k} ({n})" for k, n in s.error_kinds.items())
            notes.append(
                f"- **{s.name}**: {s.errors} of {s.requests} requests failed: {kinds}. "
                "Failed requests are left out of every phase statistic."
            )
        if "chunks" in s.output_tokens_source:
            notes.append(
                f"- **{s.name}**: the server sent no usage chunk for some requests; their "
                "output tokens are counted from chunks."
            )
    notes += [f"- {f.text}." for f in summary.findings if f.scenario is None]
    return notes


def _server_lines(info: dict[str, Any]) -> list[str]:
    """What server it was, with which flags, and how the requests carried their tools."""
    lines = []
    server = info.get("server") or {}
    target = info.get("target") or {}
    name = server.get("name") or target.get("server")
    if server.get("version") or name:
        version = f" {server['version']}" if server.get("version") else ""
        lines.append(
            f"- server: {name or 'unknown type'}{version}"
            + (f", started in {target['startup_s']:.0f} s" if target.get("startup_s") else "")
        )
    if server.get("command"):
        lines.append(
            f"- server command ({server.get('source', '?')}): `{' '.join(server['command'])}`"
        )
    tools = info.get("tools") or {}
    if tools.get("mode"):
        lines.append(
            f"- tool definitions: {TOOL_MODES.get(tools['mode'], tools['mode'])}"
            + (f"; the probe saw: {tools['refused']}" if tools.get("refused") else "")
        )
    return lines


def _interrupted_banner(stopped: Interrupted) -> str:
    where = f" during {', '.join(stopped.scenarios)}" if stopped.scenarios else ""
    return (
        f"**Interrupted**: the run was stopped by {stopped.signal or 'a signal'}{where}. "
        "What finished is below; requests in flight are counted as failed (`cancelled`), "
        "and the scenarios after it did not run."
    )


def render_report(
    summary: Summary,
    info: dict[str, Any],
    sections: list[str] | None = None,
    growth: list[GrowthRow] | None = None,
) -> str:
    """The report; `sections` are extra markdown sections (profiling, telemetry...) placed
    before the notes."""
    scenarios = summary.scenarios
    host = info.get("host", {})
    stopped = summary.interrupted
    short = summary.in_short
    parts = [
        "# cputax run report",
        "",
        *emulated_banner(info),
        *([_interrupted_banner(stopped), ""] if stopped else []),
        *([short, ""] if short else []),
        f"- endpoint: `{info.get('endpoint')}` ({info.get('target', {}).get('kind', 'external')}), "
        f"model `{info.get('model')}`, API `{info.get('api')}`",
        f"- profile: `{info.get('profile')}`; prompts sized by {info.get('prompt_counter')}",
        f"- client host: {host.get('cpu_model', '?')}, {host.get('cpus', '?')} CPUs, "
        f"Python {host.get('python', '?')}",
        "- server metrics: "
        + (
            "scraped from /metrics"
            if info.get("server_metrics")
            else "none exported (server-side columns absent)"
        ),
        *_server_lines(info),
        "",
        "## Decomposition (the study's table, measured at vLLM's real boundaries)",
        "",
        study_table(scenarios) if scenarios else "_no finished requests_",
        "",
        "## Client side",
        "",
        client_table(scenarios) if scenarios else "",
        "",
    ]
    server = server_table(scenarios)
    parts += ["## Server side (its own Prometheus metrics, per-scenario deltas)", ""]
    parts += [
        server
        if server
        else "_the server exported no metrics: nothing to show here (absent, not zero)_",
        "",
    ]
    grown = growth_table(growth or [])
    if grown:
        parts += ["## HTTP overhead growth with concurrency", "", grown, ""]
    for section in sections or []:
        parts += [section.rstrip(), ""]
    notes = _notes(summary, info)
    notes += [
        f"- **{line.split(': ', 1)[0]}**: {line.split(': ', 1)[1]}."
        for line in summary.shard_failures
    ]
    if summary.clock_steps:
        notes.append(
            f"- **clock**: the wall clock was set {summary.clock_steps} time(s) during the run "
            "(NTP, a virtual machine's time sync). The kernel's receive stamps are wall-clock "
            "times: their conversion was read again each time, and the stamps of the moment before "
            "it was noticed (at most a second) may be off by the step."
        )
    parts += (
        ["## Notes", ""]
        + (notes or ["- nothing unusual: every request finished and prompts were on size."])
        + [""]
    )
    parts += ["## How to read this", "", PHASE_NOTES]
    return "\n".join(parts)
