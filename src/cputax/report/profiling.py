"""The report's "Where the server's CPU time went" section, the sampling-overhead table, and
the same tables for `cputax profile` and `cputax attribute` in a terminal."""

from __future__ import annotations

from pathlib import Path

from cputax.records import Results
from cputax.report.format import ms, number, share, signed_pct, table
from cputax.results.attribution import (
    AttributionResult,
    FileAttribution,
    Finding,
    FrameCount,
    GilInIdleFrames,
    OwnMetrics,
    SamplingOverhead,
    ScrapeCost,
    StepWait,
    ThreadRow,
    Window,
    WorkerWait,
)
from cputax.sampling.pyspy import SamplerConfig
from cputax.servers import CATEGORIES, MEANINGS
from cputax.workload.profiles import CONTROL_SUFFIX

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


def _samples(r: ThreadRow) -> str:
    """The sample count, and how many of them had no stack at all."""
    return f"{r.samples:,}" + (f" ({r.empty:,} empty)" if r.empty else "")


def _busy(r: ThreadRow) -> str:
    """Busy share with its 95% interval; ⚠ where host telemetry's CPU (schedstat) disagrees."""
    active = r.active
    if active is None:
        return share(active, "0%")
    lo, hi = r.active_interval or (active, active)
    mark = ""
    if r.cpu_agrees is False:
        mark = " ⚠ schedstat " + share(r.schedstat)
    return f"{share(active, '0%')} [{share(lo, '0%')}-{share(hi, '0%')}]{mark}"


def thread_table(
    rows: list[ThreadRow], cols: list[str], views: dict[str, str] | None = None
) -> str:
    """One row per thread: samples, busy share, a column per category in `cols` (those that
    matter, analysis.attribution.columns)."""
    gil = any(r.gil is not None for r in rows)
    waits = any(r.gil_wait is not None for r in rows)
    header = (
        ["Process", "Thread", "Samples", "Busy", *cols]
        + (["GIL held"] if gil else [])
        + (["GIL wait (est.)"] if waits else [])
        + (["Views"] if views else [])
    )
    body, shown = [], set()
    for r in rows:
        thread = r.thread + (f" ({r.role})" if r.role else "")
        if r.too_few:  # a share of so few samples is not data (analysis.support)
            few = f"too few samples ({r.samples})"
            cells = [r.process, thread, _samples(r), few, *(few for _ in cols)]
        else:
            cells = [
                r.process,
                thread,
                _samples(r),
                _busy(r),
                *(share(r.categories.get(c)) for c in cols),
            ]
        if gil:
            cells.append(share(r.gil, "0%"))
        if waits:
            cells.append(share(r.gil_wait, "0%") if r.gil_wait is not None else "")
        if views:
            cells.append("" if r.process in shown else views.get(r.process, ""))
            shown.add(r.process)
        body.append(cells)
    return table(header, body)


VIEWS = (("svg", "flamegraph"), ("speedscope", "speedscope"), ("chrometrace", "trace"))


def _views(window: Window) -> dict[str, str]:
    return {
        p.process: " · ".join(
            f"[{label}]({p.files[key]})" for key, label in VIEWS if key in p.files
        )
        for p in window.processes
    }


def _headline(window: Window) -> str | None:
    """The busiest (thread, category) pair (analysis.attribution.headline), as a sentence."""
    best = window.headline
    if best is None:
        return None
    role = f" ({best.role.split(':')[0]})" if best.role else ""
    return (
        f"During {window.name}, the {best.process} thread {best.thread}{role} spent "
        f"{100 * best.share:.0f}% of its time in {best.category}."
    )


def _warnings(window: Window, rate: float) -> list[str]:
    out = []
    for p in window.processes:
        if p.status != "ok":
            out.append(f"- {p.process}: {p.message}")
        if p.fell_behind:
            late = f", up to {p.behind_s:.1f} s late" if p.behind_s else ""
            out.append(
                f"- {p.process}: py-spy took {number(p.effective_rate, 0)} samples/s per "
                f"thread of the {rate:g} asked{late} (CPU saturated, or too high a rate): "
                "shares are still estimates of time, with fewer samples"
            )
        if p.partial and p.coverage is not None:
            out.append(
                f"- {p.process}: sampled {100 * p.coverage:.0f}% of the window "
                "(py-spy attaches after the scenario starts)"
            )
    return out


def finding_text(finding: Finding) -> str:
    """One finding (analysis.profiling_findings) as a sentence of the report."""
    match finding:
        case WorkerWait():
            queued = ""
            if finding.queue_ms is not None:
                queued = (
                    f", while the engine's own queue time averaged {ms(finding.queue_ms)} "
                    "ms: requests waited for batch capacity (the running batch's model "
                    "steps), not for scheduler CPU"
                )
            return (
                f"- **{finding.process} {finding.thread}**: {100 * finding.wait:.0f}% of its "
                "time waiting for its workers' model step (`worker_wait`; vLLM waits by "
                "spinning on shared memory, so this is CPU busy, not idle), "
                f"{100 * finding.scheduling:.1f}% scheduling and managing the KV cache"
                f"{queued}."
            )
        case StepWait():
            return (
                f"- **{finding.process} {finding.thread}**: {100 * finding.share:.0f}% of "
                "its time waiting for the engine's next step (`step_wait`, also a spin): "
                "the model had nothing to run then."
            )
        case OwnMetrics():
            shares = ", ".join(
                f"{100 * v:.1f}% of {process} {thread}" for process, thread, v in finding.threads
            )
            return (
                "- The server's own request instrumentation (`metrics`: Prometheus "
                f"middleware, stat loggers) took {shares}."
            )
        case GilInIdleFrames():
            frames = ", ".join(f"`{f}`" for f in finding.frames)
            return (
                f"- **{finding.process} {finding.thread}** held the GIL "
                f"{100 * finding.gil:.0f}% of the time, {100 * finding.in_idle:.0f} points "
                f"of it in frames the rules call idle ({frames}): the event loop's own C "
                "code holds the GIL while it dispatches callbacks, so GIL held can exceed "
                "Busy."
            )
        case ScrapeCost():
            return (
                f"- Answering cputax's {finding.polls} gauge polls of /metrics "
                f"(`metrics_scrape`) took {1000 * finding.thread_s:,.0f} ms of server thread "
                f"time, {1000 * finding.per_poll_s:,.1f} ms a scrape."
            )
    raise TypeError(f"not a finding: {finding!r}")


def window_text(window: Window, rate: float, links: bool = True) -> str:
    parts = [f"### {window.name}", ""]
    if headline := _headline(window):
        parts += [headline, ""]
    if window.findings:
        parts += [*map(finding_text, window.findings), ""]
    parts += [
        thread_table(window.threads, window.columns, _views(window) if links else None)
        if window.threads
        else "_no samples in this window_",
        "",
    ]
    parts += _warnings(window, rate)
    return "\n".join(parts).rstrip()


def categories_text(windows: list[Window]) -> str | None:
    """What each category that appears in these windows means, in one line each."""
    seen = {c for w in windows for c in w.columns}
    if not seen:
        return None
    lines = [f"- `{c}`: {MEANINGS[c]}" for c in CATEGORIES if c in seen]
    return "What the categories mean:\n\n" + "\n".join(lines)


def other_text(other_top: list[FrameCount]) -> str | None:
    if not other_top:
        return None
    frames = "\n".join(f"- `{frame}`: {n:,} samples" for frame, n in other_top[:5])
    return (
        "Innermost frames of samples no rule matched (`other`; extend the table to place "
        f"them):\n\n{frames}"
    )


def _core(core: float | None, cores: float | None, cpus: int | None) -> str:
    if core is None:
        return "absent"
    return f"{core:.1f}%" + (f" ({cores:.1f}% of {cpus})" if cores is not None else "")


def overhead_text(overhead: SamplingOverhead | None) -> str | None:
    """Sampled vs unsampled runs of the same scenarios (`--pyspy-overhead`), as analysis
    judged them (analysis.profiling_findings.sampling_overhead)."""
    if overhead is None or not overhead.pairs:
        return None
    rows = [
        [
            p.name,
            f"{number(p.tps_on, 1)} / {number(p.tps_off, 1)}",
            signed_pct(p.tps_change_pct),
            f"{ms(p.ttft_on_ms)} / {ms(p.ttft_off_ms)}",
            signed_pct(p.ttft_change_pct),
            _core(p.pyspy_core_pct, p.pyspy_cores_pct, overhead.cpus),
        ]
        for p in overhead.pairs
    ]
    text = table(
        [
            "Scenario",
            "output tok/s sampled / not",
            "Δ",
            "TTFT ms sampled / not",
            "Δ",
            "py-spy CPU: % of one core (of all cores)",
        ],
        rows,
    )
    parts = [
        "### Sampling overhead",
        "",
        f"Each scenario ran twice, with and without py-spy (`NAME{CONTROL_SUFFIX}`, the "
        "order alternating). TTFT = serialize + HTTP OH + prefill, means.",
        "",
        text,
        "",
    ]
    o = overhead
    if o.tps_mean_pct is not None:
        ttft = f", TTFT {o.ttft_mean_pct:+.1f}%" if o.ttft_mean_pct is not None else ""
        cost = (
            f"; py-spy itself used {o.pyspy_core_pct:.1f}% of one core"
            if o.pyspy_core_pct is not None
            else ""
        )
        parts.append(
            f"Mean over {o.pairs_measured} pairs: throughput {o.tps_mean_pct:+.1f}% "
            f"(pairs from {o.tps_min_pct:+.1f}% to {o.tps_max_pct:+.1f}%){ttft}{cost}. "
            f"The budget is {o.budget_pct:g}%; a mean inside the spread of the pairs is "
            "noise, not overhead: repeat the scenarios (or lengthen them) to narrow it."
        )
    return "\n".join(parts).rstrip()


def profiling_section(results: Results) -> str | None:
    """The report's py-spy section; None when the run did not ask for py-spy."""
    info = results.info
    monitor = (info.get("monitors") or {}).get("pyspy")
    result = results.attribution
    if monitor is None and result is None:
        return None
    parts = ["## Where the server's CPU time went (py-spy)", ""]
    if result is None:
        why = (monitor or {}).get("problem") or "nothing was sampled"
        return "\n".join(parts + [f"_No profiles: {why}._"])
    config = (monitor or {}).get("config") or {}
    described = SamplerConfig(**config).describe() if config else f"{result.rate:g} Hz"
    parts += [
        HOW.format(
            version=(monitor or {}).get("pyspy") or "",
            config=described,
            rules=result.rules,
            alignment=result.alignment_ms,
        ),
        "",
    ]
    for window in result.windows:
        parts += [window_text(window, result.rate), ""]
    if other := other_text(result.other_top):
        parts += [other, ""]
    if meanings := categories_text(result.windows):
        parts += [meanings, ""]
    notes = (monitor or {}).get("notes") or []
    if notes or (monitor or {}).get("problem"):
        parts += ["Sampling notes:", ""] + [f"- {n}" for n in notes]
        if (monitor or {}).get("problem"):
            parts.append(f"- stopped sampling: {monitor['problem']}")
        parts.append("")
    if overhead := overhead_text(result.overhead):
        parts += [overhead, ""]
    return "\n".join(parts).rstrip()


def attribution_text(result: AttributionResult, out: Path) -> str:
    """`cputax profile`'s terminal output (markdown)."""
    server = result.server or "not recognised (common rules only)"
    parts = [f"server: {server}; files under {out / 'pyspy'}", ""]
    for window in result.windows:
        parts += [window_text(window, result.rate, links=False), ""]
    if other := other_text(result.other_top):
        parts.append(other)
    return "\n".join(parts).rstrip()


def file_text(result: FileAttribution) -> str:
    """`cputax attribute`'s terminal output (markdown)."""
    overall = ", ".join(
        f"{c} {share(v)}"
        for c, v in sorted(result.categories.items(), key=lambda kv: -kv[1])
        if share(v)
    )
    server = result.server or "not recognised (common rules only)"
    parts = [
        f"server: {server}; {result.source}",
        f"all threads: {overall}",
        "",
        thread_table(result.threads, result.columns),
    ]
    if other := other_text(result.other_top):
        parts += ["", other]
    return "\n".join(parts)
