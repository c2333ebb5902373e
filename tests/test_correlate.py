"""GPU-idle correlation on synthetic timelines whose answers are known by construction."""

import pytest

from cputax.analysis.correlate import (
    NO_PYSPY,
    correlate_scenario,
    pending_states,
    request_phases,
)
from cputax.analysis.timeline import GpuBusy, Grid, Interval, gpu_busy, host_series, read_telemetry
from cputax.records import RequestRecord, RequestTable

S = 1_000_000_000
MS = 1_000_000


def req(start, sent, headers, first, last, end, **kw):
    return RequestRecord(
        scenario="s",
        ok=True,
        t_start=int(start * S),
        t_sent=int(sent * S),
        t_headers=int(headers * S),
        t_first_token=int(first * S),
        t_last_token=int(last * S),
        t_end=int(end * S),
        **kw,
    )


def seconds(spans):
    return [(round(a / S, 6), round(b / S, 6), label) for a, b, label in spans]


def steps(*pieces, dev=0, kind="gpm", res_ms=100.0):
    """A GPU busy series from (t0_s, t1_s, busy%) pieces, cut into res_ms windows."""
    gpu = GpuBusy(backend="test")
    out = []
    for t0, t1, v in pieces:
        t = int(t0 * S)
        while t < int(t1 * S):
            out.append(Interval(t, min(t + int(res_ms * MS), int(t1 * S)), v))
            t += int(res_ms * MS)
    gpu.intervals[(dev, kind)] = out
    gpu.resolution_ms[(dev, kind)] = res_ms
    return gpu


# Two requests; the GPU is busy for the first, idle 4-6 s, busy for the second's decode.
# Request B: built 4.5-4.6 s (client), front end 4.6-5.5 s, prefill 5.5-6.0 s.
RECORDS = [req(0.0, 0.1, 0.2, 0.5, 3.9, 4.0), req(4.5, 4.6, 5.5, 6.0, 9.5, 9.6)]
TABLE = RequestTable.from_records(RECORDS)
GPU = steps((0, 4, 100.0), (4, 6, 0.0), (6, 10, 100.0))
WINDOW = (0, 10 * S)


def test_request_phases_and_pending_states():
    phases = request_phases(RequestTable.from_records(RECORDS[:1])).spans()
    assert phases == [
        (0, int(0.1 * S), "client"),
        (int(0.1 * S), int(0.2 * S), "front_end"),
        (int(0.2 * S), int(0.5 * S), "prefill"),
        (int(0.5 * S), int(3.9 * S), "decode"),
        (int(3.9 * S), int(4.0 * S), "client"),
    ]
    states = pending_states(request_phases(RequestTable.from_records(RECORDS)))
    assert seconds(states) == [
        (0.0, 0.1, "client"),
        (0.1, 0.2, "front_end"),
        (0.2, 3.9, "engine"),
        (3.9, 4.0, "client"),
        (4.5, 4.6, "client"),
        (4.6, 5.5, "front_end"),
        (5.5, 9.5, "engine"),
        (9.5, 9.6, "client"),
    ]


def test_overlapping_requests_take_the_most_advanced_state():
    # A at the engine while B waits for headers: the state is "engine", not "front_end"
    states = pending_states(
        request_phases(
            RequestTable.from_records(
                [req(0, 0.1, 0.2, 0.3, 2.0, 2.1), req(1.0, 1.1, 1.5, 1.6, 1.8, 1.9)]
            )
        )
    )
    assert seconds(states) == [
        (0.0, 0.1, "client"),
        (0.1, 0.2, "front_end"),
        (0.2, 2.0, "engine"),
        (2.0, 2.1, "client"),
    ]


def test_stalls_split_by_state_and_category():
    categories = {
        (1, 1): [
            (int(4.6 * S), int(5.5 * S), "tokenize"),
            (int(5.5 * S), int(6.0 * S), "schedule"),
        ],
        (1, 2): [(0, 10 * S, "idle")],
    }
    g = correlate_scenario(WINDOW, TABLE, GPU, categories, None).gpu
    assert g.busy_pct == pytest.approx(80.0)
    assert g.idle_pct == pytest.approx(20.0)
    assert g.stall_s == pytest.approx(1.5)  # 4.5-6.0 s: B pending, GPU idle
    assert g.stall_pct == pytest.approx(15.0)
    assert g.idle_nothing_pending_pct == pytest.approx(5.0)  # 4.0-4.5 s: nothing in flight
    assert g.stall_by_state == pytest.approx({"engine": 0.5, "front_end": 0.9, "client": 0.1})
    split = {"tokenize": 0.9, "schedule": 0.5, "client-side gap": 0.1}
    assert g.stall_split == pytest.approx(split)
    # the report names the largest parts, each as % of the stall time (1.5 s)
    assert [(s.name, s.pct) for s in g.stall_split_top] == [
        ("tokenize", pytest.approx(60.0)),
        ("schedule", pytest.approx(100 / 3)),
        ("client-side gap", pytest.approx(20 / 3)),
    ]
    assert g.stalls == 1 and g.longest_stall_ms == pytest.approx(1500.0)
    assert g.resolution_ms == 100.0 and g.coverage_pct == pytest.approx(100.0)


def test_without_pyspy_the_server_part_is_unattributed():
    g = correlate_scenario(WINDOW, TABLE, GPU, {}, None).gpu
    assert g.stall_split == pytest.approx({NO_PYSPY: 1.4, "client-side gap": 0.1})


def test_category_time_is_shared_in_proportion_to_thread_time():
    # two threads busy in the whole server-side stall: 2 thread-seconds of tokenize per 1 of
    # schedule
    categories = {
        (1, 1): [(int(4.6 * S), int(6.0 * S), "tokenize")],
        (1, 2): [(int(4.6 * S), int(5.3 * S), "schedule"), (int(5.3 * S), int(6.0 * S), "idle")],
    }
    g = correlate_scenario(WINDOW, TABLE, GPU, categories, None).gpu
    assert g.stall_thread_s == pytest.approx({"tokenize": 1.4, "schedule": 0.7})
    assert g.stall_split["tokenize"] == pytest.approx(1.4 * 2 / 3)
    assert g.stall_split["schedule"] == pytest.approx(1.4 / 3)


def test_no_structure_finer_than_the_resolution():
    # 50 ms of idle inside each 200 ms window of a 200 ms-resolution source: the windows read 75%
    # busy, so nothing is idle, however the idle time is placed inside them
    gpu = steps((0, 10, 75.0), res_ms=200.0)
    g = correlate_scenario(WINDOW, TABLE, gpu, {}, None).gpu
    assert g.stall_s == 0 and g.idle_pct == 0 and g.busy_pct == pytest.approx(75.0)
    # a source sampled every 10 ms but measured to change only every 100 ms is binned at 100 ms
    fine = steps((0, 4.05, 100.0), (4.05, 10, 0.0), res_ms=10.0)
    fine.resolution_ms[(0, "gpm")] = 100.0
    g = correlate_scenario(WINDOW, TABLE, fine, {}, None).gpu
    assert g.resolution_ms == 100.0
    assert g.idle_pct == pytest.approx(59.0)  # the 4.0-4.1 s bin reads 50%: not idle


def test_devices_are_averaged_and_gaps_filled_from_the_next_source():
    gpu = steps((0, 10, 100.0))
    gpu.intervals[(1, "gpm")] = [Interval(0, 10 * S, 0.0)]  # a second GPU never busy
    gpu.resolution_ms[(1, "gpm")] = 100.0
    g = correlate_scenario(WINDOW, TABLE, gpu, {}, None).gpu
    assert g.busy_pct == pytest.approx(50.0) and g.stall_s == 0
    # NVML samples stop while the GPU idles; the rates fill the hole
    gpu = steps((0, 4, 100.0), (6, 10, 100.0), kind="util")
    gpu.intervals[(0, "rates")] = [Interval(0, 10 * S, 0.0)]
    gpu.resolution_ms[(0, "rates")] = 167.0
    g = correlate_scenario(WINDOW, TABLE, gpu, {}, None).gpu
    assert g.stall_s == pytest.approx(1.5) and "rates" in g.source


def test_gpu_series_from_telemetry_records():
    rows = [
        {
            "t_ns": (i + 1) * 200 * MS,
            "src": "nvidia",
            "kind": "util",
            "dev": 0,
            "gpu": 100 if i < 5 else 0,
        }
        for i in range(10)
    ]
    rows += [
        {"t_ns": t * MS, "src": "nvidia", "kind": "rates", "dev": 0, "gpu": 0, "mem": 0}
        for t in (0, 1000)
    ]
    meta = {
        "nvidia": {
            "alignment_ms": 0.02,
            "series": {
                "0": {"samples": {"resolution_ms": 200.0}, "rates": {"resolution_ms": 167.0}}
            },
        }
    }
    busy = gpu_busy(read_telemetry(rows), meta)
    assert busy.backend == "nvidia" and busy.alignment_ms == 0.02
    assert list(busy.intervals) == [(0, "util"), (0, "rates")]  # best source first
    util = busy.intervals[(0, "util")]
    assert (util[0].t0_ns, util[0].t1_ns, util[0].value) == (
        0,
        200 * MS,
        100,
    )  # each covers the period before it
    assert (util[5].t0_ns, util[5].t1_ns, util[5].value) == (1000 * MS, 1200 * MS, 0)
    assert busy.intervals[(0, "rates")][0] == Interval(
        0, 1000 * MS, 0
    )  # holds until the next value
    assert busy.resolution_ms[(0, "util")] == 200.0


def test_grid_bins():
    grid = Grid(0, 250, 100)
    assert grid.n == 3 and grid.bounds(2) == (200, 250)
    assert grid.averages([Interval(0, 150, 10.0), Interval(150, 250, 40.0)]) == [10.0, 25.0, 40.0]
    assert grid.sums([Interval(50, 250, 200.0)]) == [50.0, 100.0, 50.0]
    assert grid.occupancy([(0, 250, "a"), (0, 50, "a")])["a"] == [1.5, 1.0, 1.0]
    assert grid.averages([Interval(300, 400, 1.0)]) == [None, None, None]


def test_occupancy_of_columns_matches_the_span_by_span_loop():
    import numpy as np

    rng = np.random.default_rng(7)
    t0 = rng.integers(-50, 900, 500)
    t1 = t0 + rng.integers(1, 400, 500)  # some start before the grid, some end after it
    grid = Grid(0, 1000, 70)
    loop = grid.occupancy([(int(a), int(b), "x") for a, b in zip(t0, t1, strict=True)])["x"]
    assert grid.occupancy_of(t0.astype(float), t1.astype(float)) == pytest.approx(loop, rel=1e-9)


def test_host_series_and_usage_from_cumulative_counters():
    def proc(t_ms, threads, cpu_s=0.0):
        return {
            "t_ns": t_ms * MS,
            "src": "host",
            "kind": "proc",
            "pid": 7,
            "role": "server",
            "cpu_s": cpu_s,
            "threads": threads,
        }

    rows = [
        {"t_ns": 0, "kind": "proc_info", "pid": 7, "role": "server", "name": "vllm", "cmdline": []},
        {"t_ns": 0, "kind": "thread_names", "pid": 7, "names": {"7": "main", "8": "worker"}},
        proc(
            0, {"7": [5 * S, 0, 10], "8": [1 * S, 0, 5]}
        ),  # baseline: CPU before the run is not counted
        proc(
            1000, {"7": [int(5.5 * S), 100 * MS, 20]}
        ),  # main ran 0.5 s, waited 0.1 s; worker idle (absent)
        proc(
            2000, {"8": [int(1.2 * S), 0, 6], "9": [300 * MS, 0, 1]}
        ),  # worker 0.2 s; thread 9 new: all of it
        {"t_ns": 0, "kind": "system", "busy_s": 0.0, "total_s": 0.0, "cpus": 2},
        {"t_ns": 2000 * MS, "kind": "system", "busy_s": 1.0, "total_s": 4.0, "cpus": 2},
    ]
    host = host_series(read_telemetry(rows))
    from cputax.analysis.correlate import host_usage

    u = host_usage(host, (0, 2 * S))
    (p,) = u.processes
    assert p.name == "vllm" and p.role == "server"
    assert p.cpu_pct == pytest.approx(100 * 1.0 / 2)  # 0.5 + 0.2 + 0.3 s in 2 s
    assert p.wait_pct == pytest.approx(100 * 0.1 / 2)
    assert p.switches_per_s == pytest.approx((10 + 1 + 1) / 2)
    busiest = [(t.name, round(t.cpu_pct)) for t in p.threads]
    assert busiest == [("main", 25), ("?", 15), ("worker", 10)]
    assert u.system_busy_pct == pytest.approx(25.0)
    # half the window: the first interval only
    assert host_usage(host, (0, 1 * S)).processes[0].cpu_pct == pytest.approx(50.0)


def test_timeline_series_for_the_plot():
    t = correlate_scenario(WINDOW, TABLE, GPU, {}, None).timeline
    assert t.width_s == pytest.approx(0.1) and len(t.t_s) == 100
    assert t.gpu[0] == 100.0 and t.gpu[45] == 0.0
    assert t.inflight["decode"][10] == pytest.approx(1.0)
    assert t.stalls == [pytest.approx((4.5, 6.0))]
    assert t.cpu is None  # neither py-spy nor host data
