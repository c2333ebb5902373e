"""report.md from a run's summary, and the same table for the terminal."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from cputax.analysis.decompose import http_overhead_growth

STUDY_COLUMNS = (("http_overhead", "HTTP OH"), ("prefill", "Prefill"), ("decode", "Decode"), ("total", "Total"))
CLIENT_COLUMNS = (("serialize", "Serialize"), ("response_parse", "Parse"))
SERVER_COLUMNS = (("queue", "Queue"), ("prefill", "Prefill"), ("decode", "Decode"), ("ttft", "TTFT"), ("e2e", "E2E"))

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
- **Parse**: client CPU spent parsing the stream (thread CPU time).
- **CPU% / GPU%**: the study's ratios, (Serialize + HTTP OH + Parse) / Total and
  (Prefill + Decode) / Total, of the means, kept for comparability. They are not a
  measure of CPU-bound time inside the server: prefill and decode include CPU work
  (scheduling, sampling, detokenization) and HTTP OH includes waiting.
"""


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "absent"
    return f"{value:,.{digits}f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "absent"
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "absent" if value is None else f"{value:.1f}%"


def _phase(s: dict[str, Any], key: str) -> str:
    """mean (p50 / p99)."""
    return f"{_ms(s['mean_ms'][key])} ({_ms(s['p50_ms'][key])} / {_ms(s['p99_ms'][key])})"


def _ctx(s: dict[str, Any]) -> str:
    actual = s["prompt_tokens_mean"]
    flag = " ⚠" if s.get("prompt_tokens_flagged") else ""
    return f"{s['context_tokens']:,} → {_fmt(actual)}{flag}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def study_table(scenarios: list[dict[str, Any]]) -> str:
    header = ["Scenario", "Conc", "Ctx (target → actual)"]
    header += [f"{label} ms mean (p50 / p99)" for _, label in STUDY_COLUMNS] + ["CPU%", "GPU%", "Errors"]
    rows = [
        [s["name"], str(s["concurrency"]), _ctx(s)]
        + [_phase(s, key) for key, _ in STUDY_COLUMNS]
        + [_pct(s["cpu_pct"]), _pct(s["gpu_pct"]), f"{s['errors']}/{s['requests']}"]
        for s in scenarios
    ]
    return _table(header, rows)


def client_table(scenarios: list[dict[str, Any]]) -> str:
    header = ["Scenario"] + [f"{label} ms mean (p50 / p99)" for _, label in CLIENT_COLUMNS]
    header += ["build CPU ms", "parse CPU µs/chunk", "achieved conc", "req/s", "output tok/s"]
    rows = []
    for s in scenarios:
        thr = s.get("throughput") or {}
        rows.append(
            [s["name"]] + [_phase(s, key) for key, _ in CLIENT_COLUMNS]
            + [_fmt(s["client_cpu_ms"]["build"], 2), _fmt(s["client_cpu_ms"]["parse_per_chunk_us"], 1),
               _fmt(s.get("achieved_concurrency"), 1), _fmt(thr.get("requests_per_s"), 2),
               _fmt(thr.get("output_tokens_per_s"), 0)]
        )
    return _table(header, rows)


def server_table(scenarios: list[dict[str, Any]]) -> str | None:
    with_server = [s for s in scenarios if s.get("server")]
    if not with_server:
        return None
    header = ["Scenario", "Client HTTP OH"] + [f"Server {label} ms" for _, label in SERVER_COLUMNS]
    header += ["Client prefill", "Prefix hit", "Running mean/max", "Waiting mean/max", "API CPU s/req"]
    rows = []
    for s in with_server:
        srv = s["server"]
        gauges = srv["gauges"]
        hit = srv["prefix_cache_hit_rate"]
        rows.append(
            [s["name"], _ms(s["mean_ms"]["http_overhead"])]
            + [_ms(srv["mean_ms"][key]) for key, _ in SERVER_COLUMNS]
            + [_ms(s["mean_ms"]["prefill"]), "absent" if hit is None else f"{100 * hit:.1f}%"]
            + ["absent" if gauges[g] is None else f"{gauges[g]['mean']:.1f} / {gauges[g]['max']:.0f}" for g in ("running", "waiting")]
            + [_fmt(srv["api_server_cpu_s_per_request"], 3)]
        )
    return _table(header, rows)


def growth_table(scenarios: list[dict[str, Any]]) -> str | None:
    rows = http_overhead_growth(scenarios)
    if len({r["concurrency"] for r in rows}) < 2:
        return None
    return _table(
        ["Ctx", "Conc", "Scenario", "HTTP OH ms", "p99 ms", "Growth"],
        [[f"{r['context_tokens']:,}", str(r["concurrency"]), r["scenario"], _ms(r["http_overhead_ms"]),
          _ms(r["p99_ms"]), "absent" if r["growth"] is None else f"{r['growth']:.1f}x"] for r in rows],
    )


def _notes(scenarios: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    notes = []
    if info.get("target", {}).get("kind") == "embedded":
        cpus = info.get("host", {}).get("cpus", "?")
        notes.append(f"- The embedded target ran on this machine's {cpus} CPUs beside the client: its \"GPU\" "
                     "phases are CPU work, and Serialize / Parse include waiting for a core. It shows the "
                     "shape of the decomposition, not a GPU server's numbers.")
    for s in scenarios:
        if s.get("prompt_tokens_flagged"):
            notes.append(f"- **{s['name']}**: prompts averaged {_fmt(s['prompt_tokens_mean'])} tokens, "
                         f"{s['prompt_tokens_off_pct']:+.1f}% off the {s['context_tokens']:,} asked for.")
        if s["errors"]:
            kinds = ", ".join(f"{k} ({n})" for k, n in s["error_kinds"].items())
            notes.append(f"- **{s['name']}**: {s['errors']} of {s['requests']} requests failed: {kinds}. "
                         "Failed requests are left out of every phase statistic.")
        if "chunks" in s.get("output_tokens_source", []):
            notes.append(f"- **{s['name']}**: the server sent no usage chunk for some requests; their "
                         "output tokens are counted from chunks.")
        srv = s.get("server") or {}
        queue = (srv.get("mean_ms") or {}).get("queue")
        oh = s["mean_ms"]["http_overhead"]
        if queue is not None and oh is not None and oh > 10 * max(queue, 1.0):
            notes.append(f"- **{s['name']}**: HTTP OH ({_ms(oh)} ms) is far above the engine's own queue time "
                         f"({_ms(queue)} ms): the wait is in the front end (template, tokenization, event loop), "
                         "not in the scheduler.")
        ttft = (srv.get("mean_ms") or {}).get("ttft")
        client_ttft = None if oh is None else oh + s["mean_ms"]["prefill"]
        if ttft is not None and client_ttft and abs(client_ttft - ttft) > 0.25 * client_ttft:
            notes.append(f"- **{s['name']}**: the client saw TTFT {_ms(client_ttft)} ms (send -> first token), "
                         f"the server reports {_ms(ttft)} ms; the difference is time outside the server's "
                         "clock (front end before arrival is stamped, transit, client).")
    return notes


def render_report(summary: dict[str, Any], info: dict[str, Any], sections: list[str] | None = None) -> str:
    """The report; `sections` are extra markdown sections (profiling, telemetry...) placed before the notes."""
    scenarios = summary["scenarios"]
    host = info.get("host", {})
    parts = [
        "# cputax run report",
        "",
        f"- endpoint: `{info.get('endpoint')}` ({info.get('target', {}).get('kind', 'external')}), model `{info.get('model')}`, API `{info.get('api')}`",
        f"- profile: `{info.get('profile')}`; prompts sized by {info.get('prompt_counter')}",
        f"- client host: {host.get('cpu_model', '?')}, {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')}",
        f"- server metrics: {'scraped from /metrics' if info.get('server_metrics') else 'none exported (server-side columns absent)'}",
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
    parts += [server if server else "_the server exported no metrics: nothing to show here (absent, not zero)_", ""]
    growth = growth_table(scenarios)
    if growth:
        parts += ["## HTTP overhead growth with concurrency", "", growth, ""]
    for section in sections or []:
        parts += [section.rstrip(), ""]
    notes = _notes(scenarios, info)
    parts += ["## Notes", ""] + (notes or ["- nothing unusual: every request finished and prompts were on size."]) + [""]
    parts += ["## How to read this", "", PHASE_NOTES]
    return "\n".join(parts)


def summary_table(scenarios: list[dict[str, Any]]) -> Table:
    table = Table(title="cputax: per-request decomposition (ms, mean; p99 in brackets)")
    for col in ("Scenario", "Conc", "Prompt tok", "Serialize", "HTTP OH", "Prefill", "Decode", "Total", "CPU%", "GPU%", "Err"):
        table.add_column(col, justify="left" if col == "Scenario" else "right")
    for s in scenarios:
        cells = [f"{_ms(s['mean_ms'][k])} [{_ms(s['p99_ms'][k])}]" for k in ("serialize", "http_overhead", "prefill", "decode", "total")]
        table.add_row(s["name"], str(s["concurrency"]), _fmt(s["prompt_tokens_mean"]), *cells,
                      _pct(s["cpu_pct"]), _pct(s["gpu_pct"]), str(s["errors"]))
    return table
