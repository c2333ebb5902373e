"""Where the server's CPU time went: py-spy samples classified by the server's rule table,
per scenario window (the client's timestamps), per process and per thread.

Shares are of wall time per thread: a thread's `categories` sum to 1 over the window, idle
included, so "the event loop spent 24% in tokenize" reads straight off. Samples are
estimated from the timeline (seconds x rate, see sampling.stacks); `active` = not idle.

Clock: py-spy's chrometrace counts from its own start; each sampler's timeline is placed
on the run's monotonic clock at the instant its process was exec'd (`t_launched_ns`,
stamped when Popen returns). py-spy builds its recorder, the real origin, a little after
that. Against a target that switches functions at a known monotonic time, sampled at
1000 Hz on the 2-core development machine, the switch appeared between 13 ms early and
3 ms late (ALIGNMENT_MS), plus up to one sampling interval (a span starts at the first
sample that saw it). tests/test_sampling.py::test_timeline_is_on_the_run_clock checks it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from cputax.analysis.profiling_findings import add_findings
from cputax.analysis.support import agrees, too_few, wilson
from cputax.analysis.timeline import Grid, HostSeries
from cputax.results.attribution import (
    AttributionResult,
    FileAttribution,
    GilThread,
    Headline,
    ProcessView,
    ThreadRow,
    ThreadShares,
    Window,
)
from cputax.rundir import RunDir
from cputax.sampling.classify import Classifier, Stack, classifier_for, detect_server
from cputax.sampling.stacks import ThreadId, Timeline, clip, collapse, read_chrometrace, read_raw
from cputax.servers import CATEGORIES, IDLE, OTHER, get

ALIGNMENT_MS = 15.0  # py-spy timestamps vs the run's clock, worst case seen (see the docstring)
PYSPY_DEFAULT_RATE = 100  # py-spy's own default: assumed for a chrometrace cputax did not record
BEHIND_RATIO = 0.8  # fewer than 80% of the asked samples: py-spy fell behind
OTHER_TOP = 10
MIN_SHARE = 0.01  # a category gets a column when some thread spends 1% of its time there
FULL_COVERAGE = 0.9  # py-spy saw less of a window than this: the report warns
NO_FRAME = "(no Python frame: native code, or a thread between Python calls)"

CategorySpan = tuple[int, int, str]


def fractions(counter: Mapping[str, float]) -> dict[str, float]:
    """Category -> share, in CATEGORIES order, zeros left out."""
    total = sum(counter.values())
    if total <= 0:
        return {}
    return {c: counter[c] / total for c in CATEGORIES if counter.get(c, 0) > 0}


def _breakdown(
    stacks: Mapping[Stack, float], classifier: Classifier, other: Counter[str]
) -> Counter[str]:
    cats: Counter[str] = Counter()
    for stack, weight in stacks.items():
        cat = classifier.category(stack)
        cats[cat] += weight
        if cat == OTHER:
            other[stack[-1].text() if stack else NO_FRAME] += weight
    return cats


def summarize(
    threads: Mapping[tuple[str, ThreadId], Mapping[Stack, float]],
    classifier: Classifier,
    roles: Mapping[tuple[str, ThreadId], str] | None = None,
) -> ThreadShares:
    """Overall and per-thread shares, top `other` frames (`cputax attribute --json`)."""
    other: Counter[str] = Counter()
    total: Counter[str] = Counter()
    rows = []
    for (process, thread), stacks in sorted(threads.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        cats = _breakdown(stacks, classifier, other)
        total.update(cats)
        samples = sum(cats.values())
        shares = fractions(cats)
        active = 1.0 - cats[IDLE] / samples if samples else None
        # every share's support (analysis.support): samples, empty stacks, a 95% interval
        rows.append(
            ThreadRow(
                process=process,
                pid=thread.pid,
                thread=thread.label,
                tid=thread.tid,
                samples=round(samples),
                categories=shares,
                active=active,
                empty=round(sum(w for stack, w in stacks.items() if not stack)),
                too_few=too_few(samples),
                intervals={c: wilson(v, samples) for c, v in shares.items()},
                active_interval=None if active is None else wilson(active, samples),
                role=(roles or {}).get((process, thread)) or None,
            )
        )
    top = [(frame, round(n)) for frame, n in other.most_common(OTHER_TOP) if n >= 0.5]
    return ThreadShares(categories=fractions(total), threads=rows, other_top=top)


def thread_role(server: str | None, process_role: str, thread: str) -> str | None:
    """What a thread does, from the server's table (None when unknown)."""
    if server is None:
        return None
    for proc_glob, thread_glob, role in get(server).threads:
        if fnmatchcase(process_role, proc_glob) and fnmatchcase(thread, thread_glob):
            return role
    return None


def columns(rows: list[ThreadRow]) -> list[str]:
    """The categories worth a column: those some thread spends MIN_SHARE of its time in,
    busiest first (by their largest share), then other and idle where present."""
    seen: dict[str, float] = {}
    for row in rows:
        for cat, value in row.categories.items():
            seen[cat] = max(seen.get(cat, 0.0), value)
    cols = [
        c
        for c, value in sorted(seen.items(), key=lambda kv: -kv[1])
        if value >= MIN_SHARE and c not in (IDLE, OTHER)
    ]
    return cols + [c for c in (OTHER, IDLE) if c in seen]


def headline(rows: list[ThreadRow]) -> Headline | None:
    """The busiest (thread, category) pair, idle and other left out; None under MIN_SHARE."""
    best = max(
        (
            (cat, value, r)
            for r in rows
            for cat, value in r.categories.items()
            if cat not in (IDLE, OTHER)
        ),
        key=lambda x: x[1],
        default=None,
    )
    if best is None or best[1] < MIN_SHARE:
        return None
    cat, value, r = best
    return Headline(process=r.process, thread=r.thread, role=r.role, category=cat, share=value)


# --- a file given to `cputax attribute` --------------------------------------------------------
def attribute_file(path: Path, server: str = "auto", rate: float | None = None) -> FileAttribution:
    """Classify a py-spy raw (collapsed) or chrometrace file."""
    head = path.read_bytes()[:64].lstrip()
    if head.startswith((b"[", b"{")):
        rate = rate or PYSPY_DEFAULT_RATE
        per_thread = {t: collapse(spans, rate) for t, spans in read_chrometrace(path).items()}
        source = f"chrometrace, samples = seconds x {rate:g} Hz"
    else:
        per_thread = read_raw(path)
        source = "raw (collapsed) stacks"
    name = detect_server(per_thread.values()) if server == "auto" else server
    threads = {(str(t.pid) if t.pid is not None else "", t): s for t, s in per_thread.items()}
    shares = summarize(threads, classifier_for(name))
    return FileAttribution(
        server=name,
        source=source,
        categories=shares.categories,
        threads=shares.threads,
        other_top=shares.other_top,
        columns=columns(shares.threads),
    )


# --- a run (or profile) directory ----------------------------------------------------------------
def _timeline(run: RunDir, entry: dict[str, Any]) -> Timeline | None:
    path = run.path / entry["files"]["chrometrace"]
    if not path.exists():
        return None
    return read_chrometrace(path)


def _ns(entry: dict[str, Any], ts_us: float) -> int:
    return entry["t_launched_ns"] + int(ts_us * 1000)


def category_timeline(run: RunDir) -> dict[tuple[int, str], list[CategorySpan]]:
    """Per (pid, thread name): [(t0_ns, t1_ns, category)] on the run's monotonic clock
    (time.monotonic_ns(), the clock of requests.jsonl and windows.jsonl), in time order,
    adjacent spans of one category merged. Covers the sampled windows (each scenario,
    controls excluded); empty when the run has no py-spy data. Times are good to
    ALIGNMENT_MS plus one sampling interval (1/rate): a span starts at the first sample
    that saw its stack."""
    entries = run.read_manifest()
    out: dict[tuple[int, str], list[CategorySpan]] = {}
    classifiers: dict[str | None, Classifier] = {}
    for entry in entries:
        timeline = _timeline(run, entry)
        if timeline is None:
            continue
        server = entry.get("server")
        classifier = classifiers.setdefault(server, classifier_for(server))
        for thread, spans in timeline.items():
            merged = out.setdefault((entry["pid"], thread.label), [])
            for t0, t1, stack in spans:
                cat, a, b = classifier.category(stack), _ns(entry, t0), _ns(entry, t1)
                if merged and merged[-1][2] == cat and merged[-1][1] == a:
                    merged[-1] = (merged[-1][0], b, cat)
                else:
                    merged.append((a, b, cat))
    for spans in out.values():
        spans.sort()
    return out


def _client_windows(run: RunDir) -> dict[str, tuple[int, int]]:
    return {w["scenario"]: (w["start_ns"], w["end_ns"]) for w in run.read_windows()}


def _gil_shares(
    run: RunDir, entry: dict[str, Any], classifier: Classifier
) -> dict[int | None, GilThread] | None:
    """Per thread (by tid), from the --gil sampler (which records only the GIL holder): the
    share of samples in which it held the GIL (samples / (its duration x rate)), the part of
    those spent in frames the rules call idle (a loop written in C that holds the GIL while it
    dispatches, say) and those frames; None without a GIL sampler."""
    sampler = entry.get("gil_sampler") or {}
    if "gil" not in entry["files"] or not sampler.get("t_stop_ns"):
        return None
    ticks = (sampler["t_stop_ns"] - sampler["t_launched_ns"]) / 1e9 * entry["rate"]
    if ticks <= 0:
        return None
    out: dict[int | None, GilThread] = {}
    for thread, counter in read_raw(run.path / entry["files"]["gil"]).items():
        held = sum(counter.values())
        idle = Counter(
            {
                (stack[-1].text() if stack else NO_FRAME): w
                for stack, w in counter.items()
                if classifier.category(stack) == IDLE
            }
        )
        out[thread.tid] = GilThread(
            share=held / ticks,
            in_idle_frames=sum(idle.values()) / held if held else 0.0,
            idle_frames=[(f, round(n)) for f, n in idle.most_common(3)],
        )
    return out


def _host_shares(
    host: HostSeries | None, pid: int, tid: int | None, window: tuple[int, int] | None
) -> tuple[float, float] | None:
    """A thread's share of the window on a CPU and ready but waiting for one (schedstat)."""
    if host is None or tid is None or window is None or (pid, tid) not in host.thread_cpu:
        return None
    w0, w1 = window
    whole = Grid(w0, w1, max(1, w1 - w0))
    wall = w1 - w0
    if wall <= 0:
        return None
    return (
        whole.sums(host.thread_cpu[(pid, tid)])[0] / wall,
        whole.sums(host.thread_wait.get((pid, tid), []))[0] / wall,
    )


def _process_view(
    entry: dict[str, Any], window: tuple[int, int] | None, timeline: Timeline | None
) -> tuple[ProcessView, dict[ThreadId, Counter[Stack]]]:
    """One sampled process in one window: its per-thread stacks and what py-spy reported."""
    view = ProcessView(
        process=f"{entry['role']} {entry['pid']}",
        pid=entry["pid"],
        role=entry["role"],
        status=entry["status"],
        message=entry.get("message"),
        files=entry["files"],
        behind_s=entry.get("behind_s", 0.0),
        pyspy_cpu_s=entry.get("cpu_s"),
    )
    if not timeline:
        return view, {}
    first = min(spans[0][0] for spans in timeline.values() if spans)
    last = max(spans[-1][1] for spans in timeline.values() if spans)
    seen_s = sum((b - a) for spans in timeline.values() for a, b, _ in spans) / 1e6
    if entry.get("samples") and seen_s > 0:
        view.effective_rate = entry["samples"] / seen_s
        view.fell_behind = (
            view.effective_rate < BEHIND_RATIO * entry["rate"]
            or entry.get("behind_warnings", 0) > 0
        )
    lo, hi = (_ns(entry, first), _ns(entry, last)) if window is None else window
    t0, t1 = (lo - entry["t_launched_ns"]) / 1000, (hi - entry["t_launched_ns"]) / 1000
    if hi > lo:
        covered = max(0.0, min(t1, last) - max(t0, first))
        view.coverage = covered / (t1 - t0)
        view.partial = view.coverage < FULL_COVERAGE
    stacks = {
        thread: collapse(clip(spans, t0, t1), entry["rate"]) for thread, spans in timeline.items()
    }
    return view, {t: s for t, s in stacks.items() if s}


def _host_and_gil(
    row: ThreadRow,
    proc: ProcessView,
    host: HostSeries | None,
    span: tuple[int, int] | None,
    gil: dict[int | None, GilThread] | None,
) -> None:
    """A thread's schedstat shares (and whether py-spy's busy share agrees) and its GIL."""
    if (cpu := _host_shares(host, proc.pid, row.tid, span)) is not None:
        row.on_cpu, row.runqueue = cpu
        row.schedstat = sum(cpu)
        # py-spy's busy share against schedstat's (on a CPU or ready for one)
        if row.active is not None and row.samples:
            row.cpu_agrees = agrees(row.active, row.samples, sum(cpu))
    if gil is None:
        return
    held = gil.get(row.tid) or GilThread(share=0.0)
    row.gil, row.gil_in_idle_frames, row.gil_idle_frames = (
        held.share,
        held.in_idle_frames,
        held.idle_frames,
    )
    if row.on_cpu is not None and row.runqueue is not None and row.active is not None:
        row.gil_wait = max(0.0, row.active - row.on_cpu - row.runqueue)


def attribute_run(run: RunDir, host: HostSeries | None = None) -> AttributionResult | None:
    """Per window and per process/thread shares of a run (or profile) directory (what
    pyspy/attribution.json holds). None when nothing was sampled.

    With host telemetry (`host`), each thread also gets its share of the window on a CPU
    and in the run queue (schedstat), and with --pyspy-gil an estimate of the time it
    waited for the GIL: busy by its stack (not at a known wait) minus on a CPU minus
    ready for one. A thread blocked on the GIL sleeps, so it is in neither; a thread
    blocked in a C call the rules do not know as a wait is counted too.

    Each window carries its findings (analysis.profiling_findings), judged here from the
    shares alone; analyse() judges again with the summary's figures (the engine's queue
    time, cputax's /metrics polls) and adds the sampling overhead."""
    entries = run.read_manifest()
    if not entries:
        return None
    client = _client_windows(run)
    server = next((e["server"] for e in entries if e.get("server")), None)
    timelines = {i: _timeline(run, e) for i, e in enumerate(entries)}
    if server is None:
        server = detect_server(
            collapse(spans, 1.0) for tl in timelines.values() if tl for spans in tl.values()
        )
    classifier = classifier_for(server)
    names = list(dict.fromkeys(e["window"] for e in entries))
    windows, other = [], Counter()
    for name in names:
        mine = [(i, e) for i, e in enumerate(entries) if e["window"] == name]
        span = client.get(name)
        processes, threads, roles, gils = [], {}, {}, {}
        for i, entry in mine:
            view, stacks = _process_view(entry, span, timelines[i])
            gil = _gil_shares(run, entry, classifier)
            for thread, counter in stacks.items():
                key = (view.process, thread)
                threads[key] = counter
                roles[key] = thread_role(server, entry["role"], thread.label)
            processes.append(view)
            if gil is not None:
                view.gil = sum(g.share for g in gil.values())
                view.gil_threads = {str(tid): g for tid, g in gil.items()}
            gils[view.process] = gil
        shares = summarize(threads, classifier, roles)
        by_process = {p.process: p for p in processes}
        for row in shares.threads:
            _host_and_gil(row, by_process[row.process], host, span, gils[row.process])
        other.update(dict(shares.other_top))
        start, end = span or (None, None)
        windows.append(
            Window(
                name=name,
                start_ns=start,
                end_ns=end,
                wall_s=None if span is None else (end - start) / 1e9,
                processes=processes,
                categories=shares.categories,
                threads=shares.threads,
                other_top=shares.other_top,
                columns=columns(shares.threads),
                headline=headline(shares.threads),
            )
        )
    config = None
    if run.has_info():
        config = ((run.info().get("monitors") or {}).get("pyspy") or {}).get("config")
    result = AttributionResult(
        server=server,
        rules=server or "common only",
        alignment_ms=ALIGNMENT_MS,
        rate=entries[0]["rate"],
        windows=windows,
        config=config,
        other_top=[(f, n) for f, n in other.most_common(OTHER_TOP)],
    )
    add_findings(result, {})
    return result
