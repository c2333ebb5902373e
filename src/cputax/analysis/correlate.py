"""GPU-idle correlation: when did the GPU sit idle while work was pending, and what were
the server's threads doing then?

The inputs are small shapes, so it runs with whatever a run recorded:
- request phases: (t0_ns, t1_ns, phase) spans as columns, from requests.jsonl (request_phases)
- GPU busy %: timeline.GpuBusy, from telemetry.jsonl
- server CPU by category: {(pid, thread): [(t0_ns, t1_ns, category), ...]}, the shape of
  the py-spy timelines (category_spans); empty without py-spy
- host CPU: timeline.HostSeries, from telemetry.jsonl

A stall is GPU idle (busy below IDLE_BELOW_PCT in a bin) while at least one request is in
flight. GPU idleness is judged per bin of the GPU source's measured resolution, so no
stall is shorter than one bin and its ends are uncertain by up to one bin. Stall time is
split by where the pending requests were (at the engine, in the front end, or all on
the client side) and the server's part by what the server's threads were doing.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cputax.analysis.attribution import ALIGNMENT_MS as PYSPY_ALIGNMENT_MS
from cputax.analysis.attribution import category_timeline
from cputax.analysis.decompose import received
from cputax.analysis.timeline import (
    GpuBusy,
    Grid,
    HostSeries,
    gpu_busy,
    host_series,
    read_telemetry,
    source_names,
)
from cputax.records import RequestTable
from cputax.results.correlation import (
    CorrelationResult,
    GpuStalls,
    HostMeta,
    HostProcess,
    HostThread,
    HostUsage,
    Scenario,
    Share,
    Timeline,
)
from cputax.rundir import RunDir
from cputax.servers import IDLE, process_role

IDLE_BELOW_PCT = 10.0
IDLE_CATEGORIES = frozenset({IDLE})
PHASES = ("client", "front_end", "prefill", "decode")
PLOT_BINS = 400  # timeline plots: at most this many bins, and never finer than the sources
TOP_THREADS = 5
QUIET_PCT = 0.5  # a process under this CPU (% of one core) is counted in the report, not listed
STALL_SPLIT_TOP = 4  # the stall split's parts the report names
Span = tuple[int, int, str]
CategorySpans = Mapping[tuple[int, Any], Sequence[Span]]
NO_PYSPY = "unattributed (no py-spy data)"
NO_THREAD_BUSY = "no server thread busy"


@dataclass(frozen=True)
class PhaseSpans:
    """Every request's life as spans, as columns: t0, t1 (ns, floats) and the phase, an
    index into PHASES. A run of a million requests makes five million of them."""

    t0: np.ndarray
    t1: np.ndarray
    phase: np.ndarray

    def clip(self, w0: int, w1: int) -> PhaseSpans:
        """The spans within [w0, w1), cut at its ends."""
        keep = (self.t1 > w0) & (self.t0 < w1)
        return PhaseSpans(
            np.maximum(self.t0[keep], w0), np.minimum(self.t1[keep], w1), self.phase[keep]
        )

    def of(self, phase: str) -> tuple[np.ndarray, np.ndarray]:
        mine = self.phase == PHASES.index(phase)
        return self.t0[mine], self.t1[mine]

    def spans(self) -> list[Span]:
        """As (t0, t1, phase) tuples of ints, ordered by request and then by time."""
        return [
            (int(a), int(b), PHASES[p])
            for a, b, p in zip(self.t0, self.t1, self.phase, strict=True)
        ]


# (from, to, phase): the moments that bound each phase; a request that failed early ends in
# the phase it was in
_BOUNDS = (
    ("t_start", "t_sent", "client"),
    ("t_sent", "t_headers", "front_end"),
    ("t_headers", "t_first_token", "prefill"),
    ("t_first_token", "t_last_token", "decode"),
    ("t_last_token", "t_end", "client"),
)


def request_phases(table: RequestTable) -> PhaseSpans:
    """Each request's life as spans: client (build + write, and after the last token until
    the stream closed), front_end (written -> headers), prefill (headers -> first token),
    decode (first -> last token). A missing moment is skipped: the span before it runs to
    the next moment the request has. Received moments are the kernel's where recorded."""
    names = [b[0] for b in _BOUNDS] + ["t_end"]
    marks = np.stack(
        [
            received(table, n) if n in ("t_headers", "t_first_token", "t_last_token") else table[n]
            for n in names
        ],
        axis=1,
    )  # rows x 6 moments, NaN where missing
    n_rows, n_marks = marks.shape
    # the next moment present after each one: fill from the right
    nxt = np.full_like(marks, np.nan)
    later = np.full(n_rows, np.nan)
    for k in range(n_marks - 1, -1, -1):
        nxt[:, k] = later
        later = np.where(np.isnan(marks[:, k]), later, marks[:, k])
    t0, t1 = marks[:, :-1], nxt[:, :-1]
    phase = np.broadcast_to(
        np.array([PHASES.index(b[2]) for b in _BOUNDS], dtype=np.int8), t0.shape
    )
    keep = ~np.isnan(t0) & ~np.isnan(t1) & (t1 > t0)
    return PhaseSpans(t0[keep], t1[keep], phase[keep])


_ENGINE, _FRONT_END, _CLIENT, _NOTHING = range(4)
_STATES = ("engine", "front_end", "client")


def pending_states(phases: PhaseSpans) -> list[Span]:
    """Where the work was at each moment: "engine" while a request is in prefill or decode,
    else "front_end" while one awaits its headers, else "client" while one is being built
    or its stream closes. Times with nothing in flight are left out."""
    if not len(phases.t0):
        return []
    times = np.concatenate([phases.t0, phases.t1])
    order = np.argsort(times, kind="stable")
    times = times[order]
    step = np.concatenate([np.ones(len(phases.t0)), -np.ones(len(phases.t1))])[order]
    phase = np.concatenate([phases.phase, phases.phase])[order]
    open_ = {p: np.cumsum(np.where(phase == PHASES.index(p), step, 0.0)) for p in PHASES}
    state = np.where(
        open_["prefill"] + open_["decode"] > 0,
        _ENGINE,
        np.where(
            open_["front_end"] > 0, _FRONT_END, np.where(open_["client"] > 0, _CLIENT, _NOTHING)
        ),
    )
    # the state after the last event at a moment holds until the next moment
    a, b, st = times[:-1], times[1:], state[:-1]
    keep = (b > a) & (st != _NOTHING)
    a, b, st = a[keep], b[keep], st[keep]
    if not len(a):
        return []
    new = np.ones(len(a), dtype=bool)
    new[1:] = (st[1:] != st[:-1]) | (a[1:] != b[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(a)) - 1
    return [(int(a[i]), int(b[j]), _STATES[st[i]]) for i, j in zip(starts, ends, strict=True)]


def merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def overlap_ns(merged: list[tuple[int, int]], starts: list[int], a: int, b: int) -> int:
    """Length of [a, b) inside the merged, sorted intervals (starts = their start times)."""
    total = 0
    i = max(0, bisect_right(starts, a) - 1)
    while i < len(merged) and merged[i][0] < b:
        total += max(0, min(b, merged[i][1]) - max(a, merged[i][0]))
        i += 1
    return total


def _device_busy(grid: Grid, gpu: GpuBusy) -> tuple[list[float | None], list[str]]:
    """Busy % per bin, the mean over devices; each device uses its best source and fills
    bins that source left uncovered from the next (NVML samples can stop while idle)."""
    per_device, used = [], set()
    for dev in gpu.devices:
        row: list[float | None] = [None] * grid.n
        for (d, kind), intervals in gpu.intervals.items():  # in GPU_SOURCES order, best first
            if d != dev:
                continue
            for i, v in enumerate(grid.averages(intervals)):
                if row[i] is None and v is not None:
                    row[i] = v
                    used.add(kind)
        per_device.append(row)
    busy = []
    for values in zip(*per_device, strict=True):
        known = [v for v in values if v is not None]
        busy.append(sum(known) / len(known) if known else None)
    return busy, [k for k in source_names() if k in used]


def gpu_resolution(gpu: GpuBusy) -> tuple[float, str]:
    """The bin width, the coarsest of the devices' best sources, and how it was established."""
    best = {}
    for key in gpu.intervals:  # best source first
        best.setdefault(key[0], (gpu.resolution_ms[key], gpu.basis.get(key, "")))
    return max(best.values())


def category_split(
    server_stalls: list[tuple[int, int]], categories: CategorySpans
) -> tuple[dict[str, float], dict[str, float]]:
    """Server-side stall seconds split by the categories the server's threads were busy in
    (in proportion to their thread time during the stalls), and that thread time itself."""
    stall_s = sum(b - a for a, b in server_stalls) / 1e9
    if not categories:
        return ({NO_PYSPY: stall_s} if stall_s else {}), {}
    starts = [a for a, _ in server_stalls]
    thread_ns: dict[str, int] = {}
    for spans in categories.values():
        for t0, t1, category in spans:
            if category not in IDLE_CATEGORIES and (
                ov := overlap_ns(server_stalls, starts, t0, t1)
            ):
                thread_ns[category] = thread_ns.get(category, 0) + ov
    total = sum(thread_ns.values())
    thread_s = {c: ns / 1e9 for c, ns in sorted(thread_ns.items(), key=lambda kv: -kv[1])}
    if not total:
        return ({NO_THREAD_BUSY: stall_s} if stall_s else {}), thread_s
    return {c: stall_s * ns / total for c, ns in thread_ns.items()}, thread_s


def top_shares(split: Mapping[str, float], top: int, whole: float | None = None) -> list[Share]:
    """The `top` largest parts of `split`, each as % of `whole` (default: the sum of its
    parts); [] when the whole is nothing."""
    total = sum(split.values()) if whole is None else whole
    if not total:
        return []
    ranked = sorted(split.items(), key=lambda kv: -kv[1])[:top]
    return [Share(name=name, pct=100.0 * part / total) for name, part in ranked]


def gpu_stalls(
    window: tuple[int, int],
    states: list[Span],
    gpu: GpuBusy,
    categories: CategorySpans,
    idle_below: float = IDLE_BELOW_PCT,
) -> tuple[GpuStalls, list[tuple[int, int]]]:
    """GPU busy %, idle time and stalls over one window; and the stalls' spans (ns)."""
    w0, w1 = window
    res_ms, basis = gpu_resolution(gpu)
    grid = Grid(w0, w1, max(1, int(res_ms * 1e6)))
    busy, sources = _device_busy(grid, gpu)
    lengths = [hi - lo for lo, hi in map(grid.bounds, range(grid.n))]
    covered = sum(n for n, b in zip(lengths, busy, strict=True) if b is not None)
    idle = [b is not None and b < idle_below for b in busy]
    pieces = [
        (lo, hi, state) for a, b, state in states for i, lo, hi in grid.overlaps(a, b) if idle[i]
    ]
    by_state = {
        s: sum(hi - lo for lo, hi, st in pieces if st == s) / 1e9
        for s in ("engine", "front_end", "client")
    }
    stalls = merge((lo, hi) for lo, hi, _ in pieces)
    stall_s = sum(b - a for a, b in stalls) / 1e9
    idle_s = sum(n for n, i in zip(lengths, idle, strict=True) if i) / 1e9
    split, thread_s = category_split(
        merge((lo, hi) for lo, hi, st in pieces if st != "client"), categories
    )
    if by_state["client"]:
        split["client-side gap"] = by_state["client"]
    wall = (w1 - w0) / 1e9
    busy_pct = None
    if covered:
        busy_pct = sum(b * n for n, b in zip(lengths, busy, strict=True) if b is not None) / covered
    return GpuStalls(
        source=" + ".join(source_names()[s] for s in sources),
        backend=gpu.backend,
        resolution_ms=res_ms,
        resolution_basis=basis,
        alignment_ms=gpu.alignment_ms,
        idle_below_pct=idle_below,
        coverage_pct=100.0 * covered / (w1 - w0) if w1 > w0 else None,
        busy_pct=busy_pct,
        idle_pct=100.0 * idle_s / wall if wall else None,
        idle_nothing_pending_pct=100.0 * (idle_s - stall_s) / wall if wall else None,
        stall_s=stall_s,
        stall_pct=100.0 * stall_s / wall if wall else None,
        stalls=len(stalls),
        longest_stall_ms=max((b - a for a, b in stalls), default=0) / 1e6,
        stall_by_state=by_state,
        stall_split=split,
        stall_split_top=top_shares(split, STALL_SPLIT_TOP, stall_s),
        stall_thread_s=thread_s,
    ), stalls


def _label(host: HostSeries, pid: int) -> str:
    return f"{host.names.get(pid, '?')} ({pid})"


def host_usage(host: HostSeries, window: tuple[int, int]) -> HostUsage:
    """Server (and client) CPU over one window: per process % of one core, run-queue wait,
    times scheduled in per second, the busiest threads; and the whole machine's CPU."""
    w0, w1 = window
    whole = Grid(w0, w1, max(1, w1 - w0))
    wall = (w1 - w0) / 1e9
    processes = []
    for pid, intervals in host.cpu.items():
        if not any(iv.t0_ns < w1 and iv.t1_ns > w0 for iv in intervals):
            # did not live in this window (a py-spy of another scenario, a restarted child)
            continue
        cpu_s = whole.sums(intervals)[0] / 1e9
        threads = sorted(
            (
                (tid, whole.sums(iv)[0] / 1e9)
                for (p, tid), iv in host.thread_cpu.items()
                if p == pid
            ),
            key=lambda x: -x[1],
        )[:TOP_THREADS]
        found = process_role(" ".join(host.cmdlines.get(pid, [])))
        cpu_pct = 100.0 * cpu_s / wall
        processes.append(
            HostProcess(
                pid=pid,
                name=host.names.get(pid, "?"),
                role=host.roles.get(pid, "?"),
                server_role=found[1] if found and host.roles.get(pid) == "server" else None,
                cpu_pct=cpu_pct,
                quiet=cpu_pct < QUIET_PCT,
                wait_pct=100.0 * whole.sums(host.wait.get(pid, []))[0] / 1e9 / wall,
                switches_per_s=whole.sums(host.switches.get(pid, []))[0] / wall,
                threads=[
                    HostThread(
                        tid=tid,
                        name=host.thread_names.get((pid, tid), "?"),
                        cpu_pct=100.0 * s / wall,
                    )
                    for tid, s in threads
                    if s > 0
                ],
            )
        )
    processes.sort(key=lambda p: (p.role != "server", -p.cpu_pct))
    system = whole.averages(host.system)[0]
    return HostUsage(
        system_busy_pct=None if system is None else 100.0 * system,
        cpus=host.cpus,
        processes=processes,
        quiet_below_pct=QUIET_PCT,
    )


def timeline(
    window: tuple[int, int],
    phases: PhaseSpans,
    gpu: GpuBusy | None,
    categories: CategorySpans,
    host: HostSeries | None,
    stalls: list[tuple[int, int]],
) -> Timeline:
    """Binned series for the timeline plot: GPU busy, server CPU (by category with py-spy,
    else by process), requests in flight by phase, stall spans."""
    w0, w1 = window
    floor_ms = gpu_resolution(gpu)[0] if gpu else 100.0
    grid = Grid(w0, w1, max(int(floor_ms * 1e6), (w1 - w0) // PLOT_BINS + 1))
    width = [hi - lo for lo, hi in map(grid.bounds, range(grid.n))]
    out = Timeline(
        t_s=[(grid.bounds(i)[0] - w0) / 1e9 for i in range(grid.n)],
        end_s=(w1 - w0) / 1e9,
        width_s=grid.width_ns / 1e9,
        inflight={
            p: grid.occupancy_of(*phases.of(p))
            for p in PHASES
            if (phases.phase == PHASES.index(p)).any()
        },
        stalls=[((a - w0) / 1e9, (b - w0) / 1e9) for a, b in stalls],
    )
    if gpu:
        out.gpu = _device_busy(grid, gpu)[0]
    if categories:
        busy = [s for spans in categories.values() for s in spans if s[2] not in IDLE_CATEGORIES]
        out.cpu, out.cpu_by = grid.occupancy(busy), "category"
    elif host:
        out.cpu = {
            _label(host, pid): [ns / w for ns, w in zip(grid.sums(iv), width, strict=True)]
            for pid, iv in host.cpu.items()
            if host.roles.get(pid) == "server"
        }
        out.cpu_by = "process"
    return out


def category_spans(run: RunDir) -> CategorySpans:
    """The one place py-spy data enters: server CPU by category per (pid, thread) on the
    run's monotonic clock (good to PYSPY_ALIGNMENT_MS), or {} when the run has none."""
    return category_timeline(run)


EMULATED_STEP = "gpu_wait"  # py-spy's category of the emulated GPU's forward (servers/vllm.py)


def without_emulated_step(categories: CategorySpans) -> CategorySpans:
    """The emulated GPU's own sleep is known exactly from its steps; py-spy's alignment (a
    few ms) would smear it into the gaps between them, which are the CPU side's time."""
    return {key: [s for s in spans if s[2] != EMULATED_STEP] for key, spans in categories.items()}


def correlate_scenario(
    window: tuple[int, int],
    table: RequestTable,
    gpu: GpuBusy | None,
    categories: CategorySpans,
    host: HostSeries | None,
    idle_below: float = IDLE_BELOW_PCT,
    name: str = "",
) -> Scenario:
    phases = request_phases(table).clip(*window)
    result = Scenario(name=name, wall_s=(window[1] - window[0]) / 1e9)
    stalls: list[tuple[int, int]] = []
    if gpu:
        result.gpu, stalls = gpu_stalls(window, pending_states(phases), gpu, categories, idle_below)
    if host:
        result.host = host_usage(host, window)
    result.timeline = timeline(window, phases, gpu, categories, host, stalls)
    return result


def correlate_run(
    run: RunDir,
    info: dict[str, Any] | None = None,
    table: RequestTable | None = None,
    by_kind: dict[str, list[dict[str, Any]]] | None = None,
) -> CorrelationResult:
    """Per scenario: GPU busy, stalls and their split, server CPU; plus the timeline series.
    `table` (requests.jsonl) and `by_kind` (telemetry.jsonl by kind) are read from the run
    when not given."""
    info = info or run.info()
    meta = (info.get("monitors") or {}).get("telemetry") or {}
    by_kind = read_telemetry(run.iter_telemetry()) if by_kind is None else by_kind
    gpu = gpu_busy(by_kind, meta)
    host = host_series(by_kind)
    categories = category_spans(run)
    if gpu is not None and gpu.backend == "emulated":
        categories = without_emulated_step(categories)
    stopped = [
        f"{name} telemetry stopped early: {m['cost']['error']}"
        for name, m in meta.items()
        if isinstance(m, dict) and (m.get("cost") or {}).get("error")
    ]
    table = run.read_request_table() if table is None else table
    scenarios = []
    for w in run.read_windows():
        if w.get("skipped"):
            continue  # never measured: no window to correlate
        mine = table.of_scenario(w["scenario"])
        scenarios.append(
            correlate_scenario(
                (w["start_ns"], w["end_ns"]), mine, gpu, categories, host, name=w["scenario"]
            )
        )
    host_meta = meta.get("host") or {}
    return CorrelationResult(
        telemetry=run.telemetry.exists(),
        gpu_backend=gpu.backend if gpu else None,
        pyspy=bool(categories),
        pyspy_alignment_ms=PYSPY_ALIGNMENT_MS if categories else None,
        notes=meta.get("notes", []) + stopped,
        host_meta=HostMeta(
            interval_ms=host_meta.get("interval_ms"),
            poll_gap_ms_p50=host_meta.get("poll_gap_ms_p50"),
            thread_cpu=host_meta.get("thread_cpu"),
        )
        if host_meta
        else None,
        scenarios=scenarios,
    )
