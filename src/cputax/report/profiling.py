"""The report's "Where the server's CPU time went" section, the sampling-overhead table, and
the same tables for `cputax profile` and `cputax attribute` in a terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cputax.records import Results
from cputax.report.format import ms, number, share, signed_pct, table
from cputax.results.format import to_builtins
from cputax.sampling.pyspy import SamplerConfig
from cputax.servers import CATEGORIES, IDLE, MEANINGS, OTHER
from cputax.workload.profiles import CONTROL_SUFFIX

MIN_SHARE = 0.01  # a category gets a column when some thread spends 1% of its time there
OVERHEAD_BUDGET_PCT = 3.0

HOW = """\
{version} sampled every server process during each scenario ({config}). Every sample
is classified by the `{rules}` rule table (src/cputax/servers/), innermost
frame first: the most specific code wins, so tokenization called from a route is
`tokenize`, not `http`. Shares are of each thread's wall time over the scenario's window
(the client's timestamps), idle included; **Busy** = not idle. Idle means the thread's
innermost Python frame is a known wait (a select, a queue or condition wait, a zmq
poll); a thread whose wait has returned but which is still waiting for the GIL shows
the wait too (`--pyspy-gil` shows who holds it), and a blocking C call with no Python
wrapper (time.sleep) counts under its caller. Samples are estimated from the timeline
(seconds x rate). Timelines sit on the run's clock within ~{alignment:g} ms. With
`--pyspy-gil`, **GIL held** is the share of samples in which the thread held the GIL (a
second py-spy with `--gil`), and **GIL wait (est.)** estimates the share it waited for
it: busy by its stack, minus on a CPU, minus ready for one (host telemetry's schedstat);
a thread blocked on the GIL sleeps, so it is in neither (nor is one blocked in a C call
the rules do not know as a wait, which the estimate also counts)."""


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, float] = {}
    for row in rows:
        for cat, value in row["categories"].items():
            seen[cat] = max(seen.get(cat, 0.0), value)
    cols = [c for c, value in sorted(seen.items(), key=lambda kv: -kv[1])
            if value >= MIN_SHARE and c not in (IDLE, OTHER)]
    return cols + [c for c in (OTHER, IDLE) if c in seen]


def _samples(r: dict[str, Any]) -> str:
    """The sample count, and how many of them had no stack at all."""
    return f"{r['samples']:,}" + (f" ({r['empty']:,} empty)" if r.get("empty") else "")


def _busy(r: dict[str, Any]) -> str:
    """Busy share with its 95% interval; ⚠ where host telemetry's CPU (schedstat) disagrees."""
    active = r.get("active")
    if active is None:
        return share(active, "0%")
    lo, hi = r.get("active_interval") or (active, active)
    mark = " ⚠ schedstat " + share(r["on_cpu"] + r["runqueue"]) if r.get("cpu_agrees") is False else ""
    return f"{share(active, '0%')} [{share(lo, '0%')}-{share(hi, '0%')}]{mark}"


def thread_table(rows: list[dict[str, Any]], views: dict[str, str] | None = None) -> str:
    """One row per thread: samples, busy share, a column per category that matters."""
    cols = _columns(rows)
    gil = any("gil" in r for r in rows)
    waits = any("gil_wait" in r for r in rows)
    header = ["Process", "Thread", "Samples", "Busy", *cols] + (["GIL held"] if gil else []) \
        + (["GIL wait (est.)"] if waits else []) + (["Views"] if views else [])
    body, shown = [], set()
    for r in rows:
        thread = r["thread"] + (f" ({r['role']})" if r.get("role") else "")
        if r.get("too_few"):  # a share of so few samples is not data (analysis.support)
            few = f"too few samples ({r['samples']})"
            cells = [r["process"], thread, _samples(r), few, *(few for _ in cols)]
        else:
            cells = [r["process"], thread, _samples(r), _busy(r),
                     *(share(r["categories"].get(c)) for c in cols)]
        if gil:
            cells.append(share(r.get("gil"), "0%"))
        if waits:
            cells.append(share(r.get("gil_wait"), "0%") if "gil_wait" in r else "")
        if views:
            cells.append("" if r["process"] in shown else views.get(r["process"], ""))
            shown.add(r["process"])
        body.append(cells)
    return table(header, body)


def _views(window: dict[str, Any]) -> dict[str, str]:
    links = {}
    for p in window["processes"]:
        f = p["files"]
        parts = [f"[{label}]({f[key]})" for key, label in (("svg", "flamegraph"), ("speedscope", "speedscope"),
                                                            ("chrometrace", "trace")) if key in f]
        links[p["process"]] = " · ".join(parts)
    return links


def _headline(window: dict[str, Any]) -> str | None:
    """The busiest (thread, category) pair, as a sentence."""
    best = max(((cat, value, r) for r in window["threads"] for cat, value in r["categories"].items()
                if cat not in (IDLE, OTHER)), key=lambda x: x[1], default=None)
    if best is None or best[1] < MIN_SHARE:
        return None
    cat, value, r = best
    role = f" ({r['role'].split(':')[0]})" if r.get("role") else ""
    return (f"During {window['name']}, the {r['process']} thread {r['thread']}{role} spent "
            f"{100 * value:.0f}% of its time in {cat}.")


def _warnings(window: dict[str, Any], rate: float) -> list[str]:
    out = []
    for p in window["processes"]:
        if p["status"] != "ok":
            out.append(f"- {p['process']}: {p['message']}")
        if p.get("fell_behind"):
            late = f", up to {p['behind_s']:.1f} s late" if p.get("behind_s") else ""
            out.append(f"- {p['process']}: py-spy took {number(p.get('effective_rate'), 0)} samples/s per thread "
                       f"of the {rate} asked{late} (CPU saturated, or too high a rate): shares are still "
                       "estimates of time, with fewer samples")
        if p.get("coverage") is not None and p["coverage"] < 0.9:
            out.append(f"- {p['process']}: sampled {100 * p['coverage']:.0f}% of the window "
                       "(py-spy attaches after the scenario starts)")
    return out


WAIT_SHARE = 0.2  # a loop thread waiting this much of its time gets its own sentence


def _sum(row: dict[str, Any], *categories: str) -> float:
    return sum(row["categories"].get(c, 0.0) for c in categories)


def engine_findings(window: dict[str, Any], scenario: dict[str, Any] | None) -> list[str]:
    """Plain sentences for what the numbers mean: the engine loop's wait for its workers (a
    spin on vLLM, so CPU busy) against its real scheduling and the engine's own queue time;
    the workers' wait for the next step; the server's own instrumentation against answering
    cputax's scrapes of /metrics."""
    out = []
    queue = ((scenario or {}).get("server") or {}).get("mean_ms", {}).get("queue")
    for row in window["threads"]:
        wait, sched = _sum(row, "worker_wait"), _sum(row, "schedule", "kv_cache", "prefix_hash")
        if wait >= WAIT_SHARE:
            queued = (f", while the engine's own queue time averaged {ms(queue)} ms: requests waited for "
                      "batch capacity (the running batch's model steps), not for scheduler CPU"
                      if queue is not None and queue >= 1.0 else "")
            out.append(f"- **{row['process']} {row['thread']}**: {100 * wait:.0f}% of its time waiting for its "
                       f"workers' model step (`worker_wait`; vLLM waits by spinning on shared memory, so this "
                       f"is CPU busy, not idle), {100 * sched:.1f}% scheduling and managing the KV cache"
                       f"{queued}.")
        step = _sum(row, "step_wait")
        if step >= 0.05:
            out.append(f"- **{row['process']} {row['thread']}**: {100 * step:.0f}% of its time waiting for the "
                       "engine's next step (`step_wait`, also a spin): the model had nothing to run then.")
    own = [(row, _sum(row, "metrics")) for row in window["threads"] if _sum(row, "metrics") >= 0.005]
    scrape_s = sum(_sum(row, "metrics_scrape") for row in window["threads"]) * (window.get("wall_s") or 0.0)
    if own:
        shares = ", ".join(f"{100 * v:.1f}% of {row['process']} {row['thread']}" for row, v in own)
        out.append(f"- The server's own request instrumentation (`metrics`: Prometheus middleware, stat loggers) "
                   f"took {shares}.")
    for row in window["threads"]:
        idle_held = (row.get("gil") or 0.0) * (row.get("gil_in_idle_frames") or 0.0)
        if idle_held >= 0.02 and row.get("gil_idle_frames"):
            frames = ", ".join(f"`{f}`" for f, _ in row["gil_idle_frames"][:2])
            out.append(f"- **{row['process']} {row['thread']}** held the GIL {100 * row['gil']:.0f}% of the time, "
                       f"{100 * idle_held:.0f} points of it in frames the rules call idle ({frames}): the event loop's "
                       "own C code holds the GIL while it dispatches callbacks, so GIL held can exceed Busy.")
    polls = ((scenario or {}).get("server") or {}).get("gauge_polls_total")
    if scrape_s > 0 and polls:
        out.append(f"- Answering cputax's {polls} gauge polls of /metrics (`metrics_scrape`) took "
                   f"{1000 * scrape_s:,.0f} ms of server thread time, {1000 * scrape_s / polls:,.1f} ms a scrape.")
    return out


def window_text(window: dict[str, Any], rate: float, links: bool = True,
                scenario: dict[str, Any] | None = None) -> str:
    parts = [f"### {window['name']}", ""]
    if headline := _headline(window):
        parts += [headline, ""]
    if findings := engine_findings(window, scenario):
        parts += [*findings, ""]
    parts += [thread_table(window["threads"], _views(window) if links else None) if window["threads"]
              else "_no samples in this window_", ""]
    parts += _warnings(window, rate)
    return "\n".join(parts).rstrip()


def categories_text(windows: list[dict[str, Any]]) -> str | None:
    """What each category that appears in these windows means, in one line each."""
    seen = {c for w in windows for row in w["threads"] for c, v in row["categories"].items() if v >= MIN_SHARE}
    if not seen:
        return None
    lines = [f"- `{c}`: {MEANINGS[c]}" for c in CATEGORIES if c in seen]
    return "What the categories mean:\n\n" + "\n".join(lines)


def other_text(other_top: list[list[Any]]) -> str | None:
    if not other_top:
        return None
    frames = "\n".join(f"- `{frame}`: {n:,} samples" for frame, n in other_top[:5])
    return f"Innermost frames of samples no rule matched (`other`; extend the table to place them):\n\n{frames}"


def _pct_change(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else 100.0 * (a - b) / b


def _tps(s: dict[str, Any]) -> float | None:
    return (s.get("throughput") or {}).get("output_tokens_per_s")


def _ttft(s: dict[str, Any]) -> float | None:
    m = s["mean_ms"]
    return None if m["prefill"] is None else m["serialize"] + m["http_overhead"] + m["prefill"]


def overhead_table(scenarios: list[dict[str, Any]], result: dict[str, Any] | None, cpus: int | None = None) -> str | None:
    """Sampled vs unsampled runs of the same scenarios (`--pyspy-overhead`). The verdict is the
    mean of the per-pair differences: with the order alternating, drift and order effects
    cancel in it, not in a total weighted by the longest scenarios."""
    by_name = {s["name"]: s for s in scenarios}
    pairs = [(s, by_name[s["name"] + CONTROL_SUFFIX]) for s in scenarios if s["name"] + CONTROL_SUFFIX in by_name]
    if not pairs:
        return None
    cpu = {w["name"]: (sum(p.get("pyspy_cpu_s") or 0.0 for p in w["processes"]), w.get("wall_s"))
           for w in (result or {}).get("windows", [])}
    rows, d_tps, d_ttft, shares = [], [], [], []
    for on, off in pairs:
        cpu_s, wall = cpu.get(on["name"], (None, None))
        core = 100 * cpu_s / wall if cpu_s and wall else None
        dt, dl = _pct_change(_tps(on), _tps(off)), _pct_change(_ttft(on), _ttft(off))
        d_tps += [dt] if dt is not None else []
        d_ttft += [dl] if dl is not None else []
        shares += [core] if core is not None else []
        rows.append([on["name"], f"{number(_tps(on), 1)} / {number(_tps(off), 1)}", signed_pct(dt),
                     f"{ms(_ttft(on))} / {ms(_ttft(off))}", signed_pct(dl),
                     "absent" if core is None else f"{core:.1f}%" + (f" ({core / cpus:.1f}% of {cpus})" if cpus else "")])
    text = table(["Scenario", "output tok/s sampled / not", "Δ", "TTFT ms sampled / not", "Δ",
                    "py-spy CPU: % of one core (of all cores)"], rows)
    parts = ["### Sampling overhead", "",
             f"Each scenario ran twice, with and without py-spy (`NAME{CONTROL_SUFFIX}`, the order alternating). "
             "TTFT = serialize + HTTP OH + prefill, means.", "", text, ""]
    if d_tps:
        mean = sum(d_tps) / len(d_tps)
        ttft = f", TTFT {sum(d_ttft) / len(d_ttft):+.1f}%" if d_ttft else ""
        cost = (f"; py-spy itself used {sum(shares) / len(shares):.1f}% of one core" if shares else "")
        parts.append(f"Mean over {len(d_tps)} pairs: throughput {mean:+.1f}% (pairs from {min(d_tps):+.1f}% to "
                     f"{max(d_tps):+.1f}%){ttft}{cost}. The budget is {OVERHEAD_BUDGET_PCT:g}%; a mean inside the "
                     "spread of the pairs is noise, not overhead: repeat the scenarios (or lengthen them) to "
                     "narrow it.")
    return "\n".join(parts).rstrip()


def profiling_section(results: Results) -> str | None:
    """The report's py-spy section; None when the run did not ask for py-spy."""
    summary, info = results.summary, results.info
    monitor = (info.get("monitors") or {}).get("pyspy")
    result = results.attribution
    if monitor is None and result is None:
        return None
    parts = ["## Where the server's CPU time went (py-spy)", ""]
    if result is None:
        why = (monitor or {}).get("problem") or "nothing was sampled"
        return "\n".join(parts + [f"_No profiles: {why}._"])
    config = (monitor or {}).get("config") or {}
    described = SamplerConfig(**config).describe() if config else f"{result['rate']} Hz"
    parts += [HOW.format(version=(monitor or {}).get("pyspy") or "", config=described, rules=result["rules"],
                         alignment=result["alignment_ms"]), ""]
    scenarios = to_builtins(summary.scenarios)  # the helpers below read scenario dicts
    by_name = {sc["name"]: sc for sc in scenarios}
    for window in result["windows"]:
        parts += [window_text(window, result["rate"], scenario=by_name.get(window["name"])), ""]
    if other := other_text(result["other_top"]):
        parts += [other, ""]
    if meanings := categories_text(result["windows"]):
        parts += [meanings, ""]
    notes = (monitor or {}).get("notes") or []
    if notes or (monitor or {}).get("problem"):
        parts += ["Sampling notes:", ""] + [f"- {n}" for n in notes]
        if (monitor or {}).get("problem"):
            parts.append(f"- stopped sampling: {monitor['problem']}")
        parts.append("")
    if overhead := overhead_table(scenarios, result, (info.get("host") or {}).get("cpus")):
        parts += [overhead, ""]
    return "\n".join(parts).rstrip()


def attribution_text(result: dict[str, Any], out: Path) -> str:
    """`cputax profile`'s terminal output (markdown)."""
    parts = [f"server: {result['server'] or 'not recognised (common rules only)'}; files under {out / 'pyspy'}", ""]
    for window in result["windows"]:
        parts += [window_text(window, result["rate"], links=False), ""]
    if other := other_text(result["other_top"]):
        parts.append(other)
    return "\n".join(parts).rstrip()


def file_text(result: dict[str, Any]) -> str:
    """`cputax attribute`'s terminal output (markdown)."""
    overall = ", ".join(f"{c} {share(v)}" for c, v in sorted(result["categories"].items(), key=lambda kv: -kv[1])
                        if share(v))
    parts = [f"server: {result['server'] or 'not recognised (common rules only)'}; {result['source']}",
             f"all threads: {overall}", "", thread_table(result["threads"])]
    if other := other_text(result["other_top"]):
        parts += ["", other]
    return "\n".join(parts)
