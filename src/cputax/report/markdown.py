"""report.md from a run's summary, and the same table for the terminal."""

from __future__ import annotations

from typing import Any

from cputax.report.emulated import emulated_banner
from cputax.report.format import ms, number, pct, ratio_cell, scenario_cell, table
from cputax.results.attribution import AttributionResult
from cputax.results.correlation import CorrelationResult
from cputax.workload.prompts import TOOL_MODES

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


def _phase(s: dict[str, Any], key: str) -> str:
    """mean (p50 / p99)."""
    return f"{ms(s['mean_ms'][key])} ({ms(s['p50_ms'][key])} / {ms(s['p99_ms'][key])})"


def _ctx(s: dict[str, Any]) -> str:
    actual = s["prompt_tokens_mean"]
    flag = " ⚠" if s.get("prompt_tokens_flagged") else ""
    return f"{s['context_tokens']:,} → {number(actual)}{flag}"


def study_table(scenarios: list[dict[str, Any]]) -> str:
    header = ["Scenario", "Conc", "Ctx (target → actual)"]
    header += [f"{label} ms mean (p50 / p99)" for _, label in STUDY_COLUMNS] + ["CPU%", "GPU%", "Errors"]
    rows = [
        [scenario_cell(s), str(s["concurrency"]), _ctx(s)]
        + [_phase(s, key) for key, _ in STUDY_COLUMNS]
        + [ratio_cell(s, "cpu_pct"), ratio_cell(s, "gpu_pct"), f"{s['errors']}/{s['requests']}"]
        for s in scenarios
    ]
    if any("gpu_bubble_pct" in s for s in scenarios):  # the emulated GPU: its bubbles beside CPU%
        col = header.index("GPU%") + 1
        header.insert(col, "GPU idle, work pending %")
        for row, s in zip(rows, scenarios, strict=True):
            row.insert(col, pct(s.get("gpu_bubble_pct")))
    return table(header, rows)


def client_table(scenarios: list[dict[str, Any]]) -> str:
    header = ["Scenario"] + [f"{label} ms mean (p50 / p99)" for _, label in CLIENT_COLUMNS]
    header += ["build CPU ms", "parse µs/chunk", "stamps", "client lag ms p50 / p99", "shared stamps",
               "achieved conc", "req/s", "output tok/s", "schedule lag ms p50 / p99"]
    rows = []
    for s in scenarios:
        thr = s.get("throughput") or {}
        lag = s.get("client_lag_ms")
        rows.append(
            [s["name"]] + [_phase(s, key) for key, _ in CLIENT_COLUMNS]
            + [number(s["client_cpu_ms"]["build"], 2), number(s["client_cpu_ms"]["parse_per_chunk_us"], 1),
               s.get("clock") or "loop", "absent" if lag is None else f"{lag['p50']:.2f} / {lag['p99']:.2f}",
               pct(s.get("shared_stamps_pct")),
               number(s.get("achieved_concurrency"), 1), number(thr.get("requests_per_s"), 2),
               number(thr.get("output_tokens_per_s"), 0), _schedule_lag(s)]
        )
    return table(header, rows)


def _schedule_lag(s: dict[str, Any]) -> str:
    """Open loop: how late requests started against their schedule ("-": closed loop)."""
    lag = s.get("schedule_lag_ms")
    return "-" if lag is None else f"{lag['p50']:.2f} / {lag['p99']:.2f}"


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
            [s["name"], ms(s["mean_ms"]["http_overhead"])]
            + [ms(srv["mean_ms"][key]) for key, _ in SERVER_COLUMNS]
            + [ms(s["mean_ms"]["prefill"]), "absent" if hit is None else f"{100 * hit:.1f}%"]
            + ["absent" if gauges[g] is None else f"{gauges[g]['mean']:.1f} / {gauges[g]['max']:.0f}" for g in ("running", "waiting")]
            + [number(srv["api_server_cpu_s_per_request"], 3)]
        )
    return table(header, rows)


def growth_table(rows: list[dict[str, Any]]) -> str | None:
    """HTTP overhead against concurrency per context size (analysis.decompose.http_overhead_growth)."""
    if len({r["concurrency"] for r in rows}) < 2:
        return None
    return table(
        ["Ctx", "Conc", "Scenario", "HTTP OH ms", "p99 ms", "Growth"],
        [[f"{r['context_tokens']:,}", str(r["concurrency"]), r["scenario"], ms(r["http_overhead_ms"]),
          ms(r["p99_ms"]), "absent" if r["growth"] is None else f"{r['growth']:.1f}x"] for r in rows],
    )


def _notes(scenarios: list[dict[str, Any]], info: dict[str, Any],
           skipped_scenarios: list[dict[str, Any]] = ()) -> list[str]:
    notes = []
    if info.get("target", {}).get("emulated_gpu"):
        notes.append("- The embedded vLLM served an emulated GPU (first lines): its model steps "
                     "took modelled time and no CPU, while everything else of vLLM and the client "
                     f"shared this machine's {info.get('host', {}).get('cpus', '?')} CPUs.")
    elif info.get("target", {}).get("kind") == "embedded":
        cpus = info.get("host", {}).get("cpus", "?")
        notes.append(f"- The embedded target ran on this machine's {cpus} CPUs beside the client: its \"GPU\" "
                     "phases are CPU work, and Serialize / Parse include waiting for a core. It shows the "
                     "shape of the decomposition, not a GPU server's numbers.")
    for skipped in skipped_scenarios:
        notes.append(f"- **{skipped['name']}**: not measured: {skipped['reason']}.")
    for s in scenarios:
        if s.get("withheld"):
            notes.append(f"- **{s['name']}**: not the server's numbers: {s['withheld']}. Its CPU% and GPU% "
                         "are withheld; its phases carry the client's own stalls (docs/invariants.md).")
        lag = s.get("schedule_lag_ms")
        if lag and lag.get("total_from_intended_p99") is not None:
            notes.append(f"- **{s['name']}**: open loop; requests started {lag['p99']:.2f} ms (p99) after "
                         f"their schedule; from the intended start, TTFT p99 "
                         f"{ms(lag.get('ttft_from_intended_p99'))} ms, total p99 "
                         f"{ms(lag['total_from_intended_p99'])} ms.")
        if s.get("prompt_tokens_flagged"):
            notes.append(f"- **{s['name']}**: prompts averaged {number(s['prompt_tokens_mean'])} tokens, "
                         f"{s['prompt_tokens_off_pct']:+.1f}% off the {s['context_tokens']:,} asked for.")
        if s["errors"]:
            kinds = ", ".join(f"{k} ({n})" for k, n in s["error_kinds"].items())
            notes.append(f"- **{s['name']}**: {s['errors']} of {s['requests']} requests failed: {kinds}. "
                         "Failed requests are left out of every phase statistic.")
        if s.get("past_client_ceiling"):
            ceiling = info["client_ceiling"]
            notes.append(f"- **{s['name']}**: {s['throughput']['chunks_per_s']:,.0f} chunks/s, past "
                         f"{ceiling.get('share', 0.8):.0%} of what this machine's client took in when "
                         f"`cputax calibrate` measured it ({ceiling['max_chunks_per_s']:,} chunks/s): "
                         "the client's own lag is in the loop's stamps, and in the kernel's once it is a "
                         "token behind (shared stamps).")
        if (s.get("shared_stamps_pct") or 0) > 1.0:
            notes.append(f"- **{s['name']}**: {s['shared_stamps_pct']:.1f}% of the tokens shared a read's "
                         "stamp with a later token: the client fell a token behind, or the server wrote "
                         "tokens together; their times are upper bounds. More client processes "
                         "(`--client-procs`) or a bigger client machine help in the first case.")
        if "chunks" in s.get("output_tokens_source", []):
            notes.append(f"- **{s['name']}**: the server sent no usage chunk for some requests; their "
                         "output tokens are counted from chunks.")
        srv = s.get("server") or {}
        if srv and srv.get("api_server_cpu_s_per_request") is None:
            notes.append(f"- **{s['name']}**: the server exported no process_cpu_seconds_total (vLLM drops it with "
                         "more than one API server): API CPU per request is absent; the host telemetry table has "
                         "every API server process's CPU.")
        queue = (srv.get("mean_ms") or {}).get("queue")
        oh = s["mean_ms"]["http_overhead"]
        if queue is not None and oh is not None and oh > 10 * max(queue, 1.0):
            notes.append(f"- **{s['name']}**: HTTP OH ({ms(oh)} ms) is far above the engine's own queue time "
                         f"({ms(queue)} ms): the wait is in the front end (template, tokenization, event loop), "
                         "not in the scheduler.")
        ttft = (srv.get("mean_ms") or {}).get("ttft")
        client_ttft = None if oh is None else oh + s["mean_ms"]["prefill"]
        if ttft is not None and client_ttft and abs(client_ttft - ttft) > 0.25 * client_ttft:
            notes.append(f"- **{s['name']}**: the client saw TTFT {ms(client_ttft)} ms (send -> first token), "
                         f"the server reports {ms(ttft)} ms; the difference is time outside the server's "
                         "clock (front end before arrival is stamped, transit, client).")
    return notes


def _server_lines(info: dict[str, Any]) -> list[str]:
    """What server it was, with which flags, and how the requests carried their tools."""
    lines = []
    server = info.get("server") or {}
    target = info.get("target") or {}
    name = server.get("name") or target.get("server")
    if server.get("version") or name:
        version = f" {server['version']}" if server.get("version") else ""
        lines.append(f"- server: {name or 'unknown type'}{version}"
                     + (f", started in {target['startup_s']:.0f} s" if target.get("startup_s") else ""))
    if server.get("command"):
        lines.append(f"- server command ({server.get('source', '?')}): `{' '.join(server['command'])}`")
    tools = info.get("tools") or {}
    if tools.get("mode"):
        lines.append(f"- tool definitions: {TOOL_MODES.get(tools['mode'], tools['mode'])}"
                     + (f"; the probe saw: {tools['refused']}" if tools.get("refused") else ""))
    return lines


def _share(part: float | None, total: float) -> str:
    return f"{100 * (part or 0.0) / total:.0f}%"


def in_short(summary: dict[str, Any], info: dict[str, Any], correlation: CorrelationResult | None,
             attribution: AttributionResult | None) -> str | None:
    """Two lines for the top of the report: where the heaviest scenario's time went, and what
    held the GPU (or, without GPU telemetry, the engine) back."""
    rows = [s for s in summary["scenarios"] if s["mean_ms"]["total"]]
    if not rows:
        return None
    s = max(rows, key=lambda r: (r.get("concurrency") or 0, r.get("context_tokens") or 0))
    m, total = s["mean_ms"], s["mean_ms"]["total"]
    first = (f"At {s['name']} ({s['concurrency']} at once, {s['context_tokens']:,}-token prompts) a request took "
             f"{ms(total)} ms: {_share(m['decode'], total)} decode, {_share(m['prefill'], total)} engine queue + "
             f"prefill, {_share(m['http_overhead'], total)} in the server's front end before the headers, "
             f"{_share(m['serialize'], total)} building it on the client.")
    gpu = next((c.gpu for c in (correlation.scenarios if correlation else [])
                if c.name == s["name"]), None)
    if gpu and gpu.busy_pct is not None:
        split = sorted(gpu.stall_split.items(), key=lambda kv: -kv[1])[:2]
        where = ""
        if split and gpu.stall_s:
            where = ", mostly " + " and ".join(name for name, _ in split)
        second = (f"The GPU was busy {gpu.busy_pct:.0f}% of that scenario and idle while requests "
                  f"were in flight {gpu.stall_pct or 0:.1f}% of it{where}.")
    else:
        second = "No GPU telemetry in this run, so GPU idle time is not measured"
        if info.get("target", {}).get("kind") == "embedded":
            second += " (the embedded target computes on this CPU: its engine time is CPU work)"
        second += "."
    if s.get("gpu_bubble_pct") is not None:
        second += (f" Between its steps, with requests at the engine, the emulated GPU sat idle "
                   f"{s['gpu_bubble_pct']:.1f}% of the scenario, where the study's CPU% reads "
                   f"{pct(s['cpu_pct'])}.")
    window = next((w for w in (attribution.windows if attribution else [])
                   if w.name == s["name"]), None)
    loop = next((r for r in (window.threads if window else [])
                 if r.process.startswith("engine_core") and r.thread == "MainThread"), None)
    if loop and loop.categories.get("worker_wait", 0) >= 0.2:
        cats = loop.categories
        second += (f" The EngineCore's loop spent {100 * cats['worker_wait']:.0f}% of it waiting for the model step "
                   f"and {100 * (cats.get('schedule', 0) + cats.get('kv_cache', 0)):.1f}% scheduling.")
    broken = [r["name"] for r in summary["scenarios"] if r.get("withheld")]
    if broken:
        first = (f"{len(broken)} scenario(s) ({', '.join(broken)}) break the run's invariants: the client's "
                 f"own stalls are in their phases, so their figures are not the server's (see Notes). "
                 + first)
    return f"**In short**: {first}  \n{second}"


def _interrupted_banner(stopped: dict[str, Any]) -> str:
    where = f" during {', '.join(stopped['scenarios'])}" if stopped.get("scenarios") else ""
    return (f"**Interrupted**: the run was stopped by {stopped.get('signal', 'a signal')}{where}. "
            "What finished is below; requests in flight are counted as failed (`cancelled`), "
            "and the scenarios after it did not run.")


def render_report(summary: dict[str, Any], info: dict[str, Any], sections: list[str] | None = None,
                  growth: list[dict[str, Any]] | None = None, short: str | None = None) -> str:
    """The report; `sections` are extra markdown sections (profiling, telemetry...) placed before the notes."""
    scenarios = summary["scenarios"]
    host = info.get("host", {})
    stopped = summary.get("interrupted")
    parts = [
        "# cputax run report",
        "",
        *emulated_banner(info),
        *([_interrupted_banner(stopped), ""] if stopped else []),
        *([short, ""] if short else []),
        f"- endpoint: `{info.get('endpoint')}` ({info.get('target', {}).get('kind', 'external')}), model `{info.get('model')}`, API `{info.get('api')}`",
        f"- profile: `{info.get('profile')}`; prompts sized by {info.get('prompt_counter')}",
        f"- client host: {host.get('cpu_model', '?')}, {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')}",
        f"- server metrics: {'scraped from /metrics' if info.get('server_metrics') else 'none exported (server-side columns absent)'}",
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
    parts += [server if server else "_the server exported no metrics: nothing to show here (absent, not zero)_", ""]
    grown = growth_table(growth or [])
    if grown:
        parts += ["## HTTP overhead growth with concurrency", "", grown, ""]
    for section in sections or []:
        parts += [section.rstrip(), ""]
    notes = _notes(scenarios, info, summary.get("skipped", []))
    notes += [f"- **{line.split(': ', 1)[0]}**: {line.split(': ', 1)[1]}." for line in summary.get("shard_failures", [])]
    if summary.get("clock_steps"):
        notes.append(f"- **clock**: the wall clock was set {summary['clock_steps']} time(s) during the run (NTP, a "
                     "virtual machine's time sync). The kernel's receive stamps are wall-clock times: their "
                     "conversion was read again each time, and the stamps of the moment before it was noticed "
                     "(at most a second) may be off by the step.")
    parts += ["## Notes", ""] + (notes or ["- nothing unusual: every request finished and prompts were on size."]) + [""]
    parts += ["## How to read this", "", PHASE_NOTES]
    return "\n".join(parts)
