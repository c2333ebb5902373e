"""pyspy/attribution.json and correlation.json as typed results: they round-trip, files
written before format versions still read, an unknown version fails in one line; and the
findings analysis judges from the py-spy shares fire at their thresholds, not below."""

from __future__ import annotations

import orjson
import pytest

from cputax.analysis.profiling_findings import (
    GIL_IDLE_SHARE,
    OWN_METRICS_SHARE,
    QUEUE_WORTH_MS,
    STEP_WAIT_SHARE,
    WAIT_SHARE,
    ScenarioFigures,
    add_findings,
    engine_findings,
    scenario_figures,
)
from cputax.errors import CputaxError
from cputax.report.profiling import finding_text, window_text
from cputax.results.attribution import (
    AttributionResult,
    GilInIdleFrames,
    GilThread,
    OverheadPair,
    OwnMetrics,
    ProcessView,
    SamplingOverhead,
    ScrapeCost,
    StepWait,
    ThreadRow,
    Window,
    WorkerWait,
)
from cputax.results.correlation import (
    CorrelationResult,
    EmulatedGpu,
    GpuStalls,
    HostMeta,
    HostProcess,
    HostThread,
    HostUsage,
    Percentiles,
    Scenario,
    Timeline,
)
from cputax.results.summary import PhaseTimes, ScenarioSummary, ServerMetrics, Summary

EPS = 1e-3


def _row(categories: dict[str, float], **kw) -> ThreadRow:
    return ThreadRow(
        process=kw.pop("process", "engine_core 2"),
        pid=2,
        thread=kw.pop("thread", "MainThread"),
        tid=2,
        samples=1000,
        categories=categories,
        **kw,
    )


def _attribution() -> AttributionResult:
    row = _row(
        {"worker_wait": 0.5, "schedule": 0.1, "idle": 0.4},
        active=0.6,
        empty=3,
        intervals={"worker_wait": (0.47, 0.53)},
        active_interval=(0.57, 0.63),
        role="engine loop",
        on_cpu=0.55,
        runqueue=0.02,
        cpu_agrees=True,
        gil=0.3,
        gil_in_idle_frames=0.1,
        gil_idle_frames=[("select (selectors.py)", 30)],
        gil_wait=0.03,
    )
    process = ProcessView(
        process="engine_core 2",
        pid=2,
        role="engine_core",
        status="ok",
        files={"svg": "pyspy/s/engine_core-2.svg"},
        pyspy_cpu_s=0.4,
        effective_rate=99.0,
        coverage=0.98,
        gil=0.3,
        gil_threads={"2": GilThread(share=0.3, in_idle_frames=0.1)},
    )
    window = Window(
        name="s",
        start_ns=1,
        end_ns=2_000_000_001,
        wall_s=2.0,
        processes=[process],
        categories={"worker_wait": 0.5, "idle": 0.5},
        threads=[row],
        other_top=[("spin (x.py)", 4)],
        findings=[
            WorkerWait(
                process="engine_core 2",
                thread="MainThread",
                wait=0.5,
                scheduling=0.1,
                queue_ms=12.0,
            ),
            StepWait(process="worker 3", thread="MainThread", share=0.1),
            OwnMetrics(threads=[("api_server 1", "MainThread", 0.01)]),
            GilInIdleFrames(
                process="api_server 1",
                thread="MainThread",
                gil=0.4,
                in_idle=0.1,
                frames=["select (selectors.py)"],
            ),
            ScrapeCost(polls=10, thread_s=0.02),
        ],
    )
    overhead = SamplingOverhead(
        pairs=[
            OverheadPair(
                name="s", tps_on=97.0, tps_off=100.0, tps_change_pct=-3.0, pyspy_core_pct=20.0
            )
        ],
        budget_pct=3.0,
        cpus=2,
        tps_mean_pct=-3.0,
        tps_min_pct=-3.0,
        tps_max_pct=-3.0,
        pyspy_core_pct=20.0,
        pairs_measured=1,
    )
    return AttributionResult(
        server="vllm",
        rules="vllm",
        alignment_ms=15.0,
        rate=100,
        windows=[window],
        other_top=[("spin (x.py)", 4)],
        config={"rate": 100},
        overhead=overhead,
    )


def _correlation() -> CorrelationResult:
    gpu = GpuStalls(
        source="GPM",
        backend="nvidia",
        resolution_ms=100.0,
        resolution_basis="measured",
        alignment_ms=0.02,
        idle_below_pct=10.0,
        coverage_pct=99.0,
        busy_pct=80.0,
        idle_pct=20.0,
        idle_nothing_pending_pct=5.0,
        stall_s=1.5,
        stall_pct=15.0,
        stalls=1,
        longest_stall_ms=1500.0,
        stall_by_state={"engine": 0.5, "front_end": 0.9, "client": 0.1},
        stall_split={"tokenize": 0.9, "schedule": 0.5},
        stall_thread_s={"tokenize": 0.9},
    )
    host = HostUsage(
        system_busy_pct=25.0,
        cpus=2,
        processes=[
            HostProcess(
                pid=7,
                name="vllm",
                role="server",
                server_role="api_server",
                cpu_pct=50.0,
                wait_pct=5.0,
                switches_per_s=6.0,
                threads=[HostThread(tid=7, name="main", cpu_pct=25.0)],
            )
        ],
    )
    timeline = Timeline(
        t_s=[0.0, 0.1],
        end_s=0.2,
        width_s=0.1,
        inflight={"decode": [1.0, 0.5]},
        stalls=[(0.1, 0.2)],
        gpu=[100.0, None],
        cpu={"tokenize": [0.2, 0.0]},
        cpu_by="category",
    )
    emulated = EmulatedGpu(
        steps=3,
        busy_pct=60.0,
        step_ms=Percentiles(p50=5.0, p99=6.0),
        bubbles=2,
        bubble_ms=Percentiles(p50=2.0, p99=2.0),
        bubble_s=0.004,
        bubble_pct=2.0,
        bubble_split={"schedule": 0.004},
    )
    scenario = Scenario(
        name="s", wall_s=0.2, gpu=gpu, host=host, timeline=timeline, emulated_gpu=emulated
    )
    return CorrelationResult(
        telemetry=True,
        gpu_backend="nvidia",
        pyspy=True,
        pyspy_alignment_ms=15.0,
        notes=["a note"],
        host_meta=HostMeta(interval_ms=100.0, poll_gap_ms_p50=101.0, thread_cpu="schedstat ns"),
        scenarios=[scenario],
        emulated_gpu=True,
    )


def test_attribution_round_trips(tmp_path):
    result = _attribution()
    result.dump(tmp_path / "attribution.json")
    loaded = AttributionResult.load(tmp_path / "attribution.json")
    assert loaded == result
    assert orjson.loads((tmp_path / "attribution.json").read_bytes())["format_version"] == 2


def test_correlation_round_trips(tmp_path):
    result = _correlation()
    result.dump(tmp_path / "correlation.json")
    assert CorrelationResult.load(tmp_path / "correlation.json") == result
    assert orjson.loads((tmp_path / "correlation.json").read_bytes())["format_version"] == 2


# a `cputax profile --gil` file as written before format versions (abridged from a real one)
V1_ATTRIBUTION = {
    "server": None,
    "rules": "common only",
    "alignment_ms": 15.0,
    "rate": 100,
    "windows": [
        {
            "name": "profile",
            "start_ns": None,
            "end_ns": None,
            "wall_s": None,
            "processes": [
                {
                    "process": "process 22098",
                    "pid": 22098,
                    "role": "process",
                    "status": "ok",
                    "message": None,
                    "files": {
                        "chrometrace": "pyspy/profile/process-22098.chrometrace.json",
                        "gil": "pyspy/profile/process-22098.gil.txt",
                    },
                    "behind_s": 0.0,
                    "pyspy_cpu_s": 0.05,
                    "effective_rate": 99.77,
                    "fell_behind": False,
                    "coverage": 1.0,
                    "gil": 0.99,
                    "gil_threads": {
                        "22100": {"share": 0.99, "in_idle_frames": 0.0, "idle_frames": []}
                    },
                }
            ],
            "categories": {"idle": 0.5, "other": 0.5},
            "threads": [
                {
                    "process": "process 22098",
                    "pid": 22098,
                    "thread": "busy-thread",
                    "tid": 22100,
                    "samples": 301,
                    "categories": {"other": 1.0},
                    "active": 1.0,
                    "empty": 0,
                    "too_few": False,
                    "intervals": {"other": [0.987, 1.0]},
                    "active_interval": [0.987, 1.0],
                    "gil": 0.99,
                    "gil_in_idle_frames": 0.0,
                    "gil_idle_frames": [],
                }
            ],
            "other_top": [["spin (/tmp/busy_attr.py)", 301]],
        }
    ],
    "other_top": [["spin (/tmp/busy_attr.py)", 301]],
}

V1_CORRELATION = {
    "telemetry": True,
    "gpu_backend": None,
    "pyspy": False,
    "pyspy_alignment_ms": None,
    "notes": [],
    "host_meta": {},
    "scenarios": [
        {
            "name": "s",
            "wall_s": 2.0,
            "host": {
                "system_busy_pct": 30.0,
                "cpus": 2,
                "processes": [
                    {
                        "pid": 7,
                        "name": "python",
                        "role": "server",
                        "server_role": None,
                        "cpu_pct": 40.0,
                        "wait_pct": 1.0,
                        "switches_per_s": 5.0,
                        "threads": [{"tid": 7, "name": "main", "cpu_pct": 40.0}],
                    }
                ],
            },
            "timeline": {
                "t_s": [0.0],
                "end_s": 2.0,
                "width_s": 2.0,
                "inflight": {"decode": [1.0]},
                "stalls": [],
                "cpu": {"python (7)": [0.4]},
                "cpu_by": "process",
            },
        }
    ],
}


def test_version_1_files_still_read(tmp_path):
    path = tmp_path / "attribution.json"
    path.write_bytes(orjson.dumps(V1_ATTRIBUTION))
    old = AttributionResult.load(path)
    (row,) = old.windows[0].threads
    assert (
        row.thread == "busy-thread"
        and row.samples == 301
        and row.intervals["other"] == (0.987, 1.0)
    )
    assert old.windows[0].processes[0].gil_threads["22100"].share == 0.99
    assert old.windows[0].findings == [] and old.overhead is None
    assert old.other_top == [("spin (/tmp/busy_attr.py)", 301)]
    path = tmp_path / "correlation.json"
    path.write_bytes(orjson.dumps(V1_CORRELATION))
    corr = CorrelationResult.load(path)
    assert corr.scenarios[0].host.processes[0].threads[0].cpu_pct == 40.0
    assert corr.scenarios[0].gpu is None and corr.scenarios[0].timeline.cpu_by == "process"


@pytest.mark.parametrize("kind", [AttributionResult, CorrelationResult])
def test_an_unknown_version_fails_in_one_line(tmp_path, kind):
    path = tmp_path / "result.json"
    path.write_bytes(orjson.dumps({"format_version": 99, "windows": "anything"}))
    with pytest.raises(CputaxError) as err:
        kind.load(path)
    message = str(err.value)
    assert "\n" not in message and "version 99" in message and "cputax report" in message


def test_engine_loop_waiting_for_its_workers_is_a_finding_from_its_threshold():
    def findings(wait, queue_ms=None):
        window = Window(
            name="s",
            threads=[_row({"worker_wait": wait, "schedule": 0.02, "idle": 1 - wait - 0.02})],
        )
        return engine_findings(window, ScenarioFigures(queue_ms=queue_ms))

    (found,) = findings(WAIT_SHARE)
    assert isinstance(found, WorkerWait) and found.wait == WAIT_SHARE and found.scheduling == 0.02
    assert findings(WAIT_SHARE - EPS) == []
    assert findings(0.5, queue_ms=QUEUE_WORTH_MS)[0].queue_ms == QUEUE_WORTH_MS
    assert findings(0.5, queue_ms=QUEUE_WORTH_MS - EPS)[0].queue_ms is None  # not worth saying


def test_worker_step_wait_and_own_metrics_fire_at_their_thresholds():
    def one(categories):
        return engine_findings(Window(name="s", threads=[_row(categories, process="worker 3")]))

    assert [type(f) for f in one({"step_wait": STEP_WAIT_SHARE})] == [StepWait]
    assert one({"step_wait": STEP_WAIT_SHARE - EPS}) == []
    (own,) = one({"metrics": OWN_METRICS_SHARE})
    assert isinstance(own, OwnMetrics) and own.threads == [
        ("worker 3", "MainThread", OWN_METRICS_SHARE)
    ]
    assert one({"metrics": OWN_METRICS_SHARE - EPS / 10}) == []


def test_gil_held_in_idle_frames_fires_at_its_threshold():
    def one(gil, in_idle):
        row = _row(
            {"idle": 1.0},
            gil=gil,
            gil_in_idle_frames=in_idle,
            gil_idle_frames=[("select (selectors.py)", 5), ("poll (x.py)", 2), ("c (y.py)", 1)],
        )
        return engine_findings(Window(name="s", threads=[row]))

    (found,) = one(0.5, 2 * GIL_IDLE_SHARE)  # 0.5 x 0.04 = the threshold, in points
    assert isinstance(found, GilInIdleFrames)
    assert found.in_idle == pytest.approx(GIL_IDLE_SHARE) and found.frames == [
        "select (selectors.py)",
        "poll (x.py)",
    ]
    assert one(0.5, 2 * GIL_IDLE_SHARE - EPS) == []


def test_scrape_cost_needs_the_polls():
    window = Window(name="s", wall_s=10.0, threads=[_row({"metrics_scrape": 0.01, "idle": 0.99})])
    (found,) = engine_findings(window, ScenarioFigures(gauge_polls=20))
    assert (
        isinstance(found, ScrapeCost) and found.thread_s == pytest.approx(0.1) and found.polls == 20
    )
    assert found.per_poll_s == pytest.approx(0.1 / 20)  # the report prints it, as ms a scrape
    assert "took 100 ms of server thread time, 5.0 ms a scrape" in finding_text(found)
    assert engine_findings(window) == []  # without the polls the cost per scrape is unknown


def test_the_report_only_renders_what_analysis_judged():
    result = AttributionResult(
        rules="vllm",
        alignment_ms=15.0,
        rate=100,
        windows=[
            Window(
                name="s",
                wall_s=2.0,
                threads=[_row({"worker_wait": 0.6, "schedule": 0.05, "idle": 0.35})],
            )
        ],
    )
    scenario = ScenarioSummary(name="s", server=ServerMetrics(mean_ms={"queue": 40.0}))
    add_findings(result, {"s": scenario_figures(scenario)})
    text = window_text(result.windows[0], result.rate)
    assert (
        "**engine_core 2 MainThread**: 60% of its time waiting for its workers' model step" in text
    )
    assert "5.0% scheduling" in text and "queue time averaged 40.0 ms" in text
    result.windows[0].findings = []
    assert "waiting for its workers" not in window_text(result.windows[0], result.rate)


def test_the_report_reads_the_typed_results_of_a_run_and_of_its_nodes():
    from cputax.analysis.analyse import node_clock
    from cputax.analysis.findings import in_short
    from cputax.records import NodeResults, Results
    from cputax.report.nodes import nodes_section

    means = PhaseTimes(total=100.0, decode=60.0, prefill=20.0, http_overhead=15.0, serialize=5.0)
    summary = Summary(
        scenarios=[ScenarioSummary(name="s", concurrency=4, context_tokens=1000, mean_ms=means)]
    )
    attribution, correlation = _attribution(), _correlation()
    short = in_short(summary.scenarios, {}, correlation, attribution)
    assert (
        "The GPU was busy 80% of that scenario" in short and "15.0% of it, mostly tokenize" in short
    )
    assert "EngineCore's loop spent 50% of it waiting for the model step" in short
    clock = node_clock({"converted": True, "offset_ns": 2_000_000, "error_ns": 50_000})
    node = NodeResults(clock=clock, attribution=attribution, correlation=correlation)
    text = nodes_section(Results({}, summary, nodes={"10.0.0.2": node}))
    assert "### Node 10.0.0.2" in text and "offset +2.000 ms" in text
    assert "#### GPU stalls" in text and "| s |" in text
    assert "**engine_core 2 MainThread**: 50% of its time waiting" in text
    assert "[flamegraph](pyspy/s/engine_core-2.svg)" in text
