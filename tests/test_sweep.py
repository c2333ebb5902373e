"""`cputax sweep`: the plan (knobs, presets, the alternating order), the comparison and the
claims on hand-made run directories with hand-computed figures, and (slow) a real sweep
of the embedded vLLM with one value it refuses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from conftest import needs_vllm

from cputax.analysis import analyse
from cputax.analysis.claims import GIL_WAIT_LONG, HASHING_NEGLIGIBLE_PCT, gil, hashing, scheduling
from cputax.analysis.support import wilson
from cputax.analysis.sweep import analyse_sweep
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord
from cputax.report.sweep import render_sweep, summary_lines
from cputax.results.attribution import AttributionResult, ProcessView, ThreadRow, Window
from cputax.results.sweep import (
    ConfigScenario,
    Configuration,
    EngineLoop,
    GilRow,
    MetricValue,
    Step,
    Sweep,
)
from cputax.rundir import RunDir, SweepDir
from cputax.servers import get
from cputax.workload.sweep import Knob, configurations, parse_help, parse_vary, plan

PRESETS = get("vllm").presets
DATA = Path(__file__).parent / "data"
HELP = """usage: vllm serve [model_tag] [options]
  --api-server-count API_SERVER_COUNT, -asc API_SERVER_COUNT
  --async-scheduling, --no-async-scheduling
  --prefix-caching-hash-algo {sha256,sha256_cbor,xxhash,xxhash_cbor}
  --enable-prefix-caching, --no-enable-prefix-caching
"""


def test_knob_values_become_flags():
    assert Knob("async-scheduling", "on").args() == ("--async-scheduling",)
    assert Knob("async-scheduling", "off").args() == ("--no-async-scheduling",)
    assert Knob("api-server-count", "2").args() == ("--api-server-count", "2")


def test_presets_and_explicit_knobs():
    knobs, preset = parse_vary("api-servers", PRESETS)
    assert [k.label for k in knobs] == [
        "api-server-count=1",
        "api-server-count=2",
    ] and preset.moves == "http_overhead_ms"
    knobs, preset = parse_vary("stream-interval=1,4,8", PRESETS)
    assert [k.value for k in knobs] == ["1", "4", "8"] and preset is PRESETS["stream-interval"]
    with pytest.raises(CputaxError, match="not a preset"):
        parse_vary("no-such-preset", PRESETS)
    with pytest.raises(CputaxError, match="expected KNOB=V1,V2"):
        parse_vary("Bad Flag=1", PRESETS)


def test_help_choices_decide_a_presets_values():
    flags = parse_help(HELP)
    assert {"api-server-count", "async-scheduling", "no-async-scheduling"} <= flags.flags
    assert flags.choices["prefix-caching-hash-algo"] == (
        "sha256",
        "sha256_cbor",
        "xxhash",
        "xxhash_cbor",
    )
    knobs, _ = parse_vary(
        "prefix-hash", PRESETS, parse_help(HELP.replace(",xxhash,xxhash_cbor", ""))
    )
    assert [k.value for k in knobs] == ["sha256", "sha256_cbor"]  # an old vLLM without xxhash
    assert flags.knows(Knob("async-scheduling", "off")) and not flags.knows(
        Knob("no-such-flag", "1")
    )


def test_every_combination_baseline_first():
    configs = configurations(
        [parse_vary("api-servers", PRESETS)[0], parse_vary("async-scheduling", PRESETS)[0]]
    )
    assert [c.name for c in configs] == [
        "api-server-count=1,async-scheduling=on",
        "api-server-count=1,async-scheduling=off",
        "api-server-count=2,async-scheduling=on",
        "api-server-count=2,async-scheduling=off",
    ]
    assert configs[3].args() == ("--api-server-count", "2", "--no-async-scheduling")
    assert configs[3].slug == "api-server-count-2__async-scheduling-off"
    with pytest.raises(CputaxError, match="names a knob twice"):
        configurations(
            [parse_vary("api-servers", PRESETS)[0], parse_vary("api-server-count=3", PRESETS)[0]]
        )


def test_repeats_alternate_the_order():
    a, b, c = configurations([parse_vary("stream-interval=1,4,8", PRESETS)[0]])
    steps = plan([a, b, c], repeat=3)
    assert [(s.configuration, s.repeat) for s in steps] == [
        (a, 0),
        (b, 0),
        (c, 0),
        (c, 1),
        (b, 1),
        (a, 1),
        (a, 2),
        (b, 2),
        (c, 2),
    ]
    assert [s.folder for s in steps[:4]] == [
        "stream-interval-1",
        "stream-interval-4",
        "stream-interval-8",
        "stream-interval-8-r1",
    ]
    with pytest.raises(CputaxError, match="--repeat must be at least 1"):
        plan([a], repeat=0)


# --- the comparison and the claims on hand-made run directories ----------------------------------
MS = 1_000_000


def _run(
    sweep: SweepDir,
    folder: str,
    http_overhead: tuple[float, float],
    decode_ms: float,
    schedule: float,
    worker_wait: float,
    prefix_hash: float,
    tokenize_loop: float,
    tokenize_pool: float,
) -> None:
    """A finished run of one scenario (two batches of one request) with py-spy and host data."""
    run = RunDir.create(sweep.run(folder).path)
    scenario = {
        "name": "s",
        "concurrency": 1,
        "context_tokens": 1000,
        "batches": 2,
        "max_tokens": 11,
    }
    run.write_info(
        {
            "scenarios": [scenario],
            "target": {"kind": "embedded", "server": "vllm"},
            "server": {"name": "vllm", "version": "0.32.0"},
        }
    )
    with JsonlWriter(run.requests) as w:
        for batch, oh in enumerate(http_overhead):
            t0 = batch * 1000 * MS
            w.write(
                RequestRecord(
                    scenario="s",
                    index=batch,
                    batch=batch,
                    ok=True,
                    t_start=t0,
                    t_sent=t0 + MS,
                    t_headers=t0 + MS + int(oh * MS),
                    t_first_token=t0 + 100 * MS,
                    t_last_token=t0 + int((100 + decode_ms) * MS),
                    t_end=t0 + int((101 + decode_ms) * MS),
                    prompt_tokens=1000,
                    output_tokens=11,
                    output_tokens_source="usage",
                    chunks=11,
                )
            )
    with JsonlWriter(run.windows) as w:
        w.write({"scenario": "s", "start_ns": 0, "end_ns": 2000 * MS, "sent": 2})
    analyse(run)  # summary.json and correlation.json from the records
    engine = {"worker_wait": worker_wait, "schedule": schedule, "idle": 1 - worker_wait - schedule}
    hash_thread = {"prefix_hash": prefix_hash, "idle": 1 - prefix_hash}
    processes = [
        ProcessView(process="api_server 1", pid=1, role="api_server", status="ok"),
        ProcessView(process="engine_core 2", pid=2, role="engine_core", status="ok"),
    ]
    threads = [
        ThreadRow(
            process="api_server 1",
            pid=1,
            thread="MainThread",
            samples=500,
            active=0.3,
            categories={"tokenize": tokenize_loop, "sse": 0.2, "idle": 0.8 - tokenize_loop},
        ),
        ThreadRow(
            process="api_server 1",
            pid=1,
            thread="ThreadPoolExecutor-0_0",
            samples=500,
            active=tokenize_pool,
            categories={"tokenize": tokenize_pool, "idle": 1 - tokenize_pool},
        ),
        ThreadRow(
            process="engine_core 2",
            pid=2,
            thread="MainThread",
            samples=500,
            active=worker_wait + schedule,
            categories=engine,
        ),
        ThreadRow(
            process="engine_core 2",
            pid=2,
            thread="Thread-1 (process_input_sockets)",
            samples=500,
            active=prefix_hash,
            categories=hash_thread,
        ),
    ]
    AttributionResult(
        rules="vllm",
        alignment_ms=15.0,
        rate=100,
        windows=[Window(name="s", processes=processes, threads=threads)],
    ).dump(run.attribution)


@pytest.fixture
def hand_made_sweep(tmp_path):
    return make_hand_made_sweep(tmp_path / "sweep")


def make_hand_made_sweep(path, xxhash_schedule=0.02):
    """Two configurations of one knob, two hand-made runs (also the browser test's sweep)."""
    sweep = SweepDir.create(path)
    configs = ["prefix-caching-hash-algo=sha256", "prefix-caching-hash-algo=xxhash"]
    sweep.write_info(
        Sweep(
            profile="p.toml",
            target="vllm",
            varies=["prefix-hash"],
            moves={"prefix-caching-hash-algo": "prefix_hash_share"},
            configurations=configs,
            steps=[Step(configuration=c, folder=c.replace("=", "-"), status="ok") for c in configs],
        )
    )
    # sha256: time to headers 10 and 14 ms (spread 4), engine loop 2% scheduling, 80% waiting
    _run(sweep, "prefix-caching-hash-algo-sha256", (10.0, 14.0), 100.0, 0.02, 0.80, 0.03, 0.0, 0.10)
    # xxhash: 20 and 22 ms (spread 2): +9 ms, beyond the larger spread (4)
    _run(
        sweep,
        "prefix-caching-hash-algo-xxhash",
        (20.0, 22.0),
        100.0,
        xxhash_schedule,
        0.80,
        0.01,
        0.0,
        0.10,
    )
    return sweep


def test_comparison_of_hand_made_runs(hand_made_sweep):
    comparison = analyse_sweep(hand_made_sweep)
    assert comparison.baseline == "prefix-caching-hash-algo=sha256"
    base = comparison.configurations[0].scenarios["s"].metrics
    assert base["http_overhead_ms"].value == pytest.approx(12.0)
    assert base["http_overhead_ms"].spread == pytest.approx(4.0)
    assert base["http_overhead_ms"].half_spread == pytest.approx(2.0)
    assert base["http_overhead_ms"].spread_basis == ["batches"]
    assert base["itl_ms"].value == pytest.approx(100.0 / 10)  # decode over the 10 gaps of 11 tokens
    (delta,) = comparison.deltas
    row = comparison.delta("prefix-caching-hash-algo=xxhash", "s", "http_overhead_ms")
    assert row in delta.rows
    assert row.delta == pytest.approx(9.0) and row.within_spread is False
    assert row.noise == pytest.approx(4.0)
    # prefix hashing: 3% of the EngineCore's busy time (0.82 + 0.03) -> 3.5%; xxhash 1 / 0.83
    shares = {
        c.name: c.scenarios["s"].metrics["prefix_hash_share"].value
        for c in comparison.configurations
    }
    assert shares == pytest.approx(
        {
            "prefix-caching-hash-algo=sha256": 100 * 0.03 / 0.85,
            "prefix-caching-hash-algo=xxhash": 100 * 0.01 / 0.83,
        }
    )
    written = orjson.loads(hand_made_sweep.info_path.read_bytes())
    assert written["format_version"] == 2
    assert written["comparison"]["baseline"] == comparison.baseline
    assert hand_made_sweep.info().comparison == comparison  # the round trip through sweep.json


def test_an_engine_loop_share_is_judged_by_its_interval(hand_made_sweep):
    """One repeat and no batches of py-spy: the share's spread is its 95% Wilson interval, so
    equal shares are inside it."""
    comparison = analyse_sweep(hand_made_sweep)
    schedule = comparison.configurations[0].scenarios["s"].metrics["schedule_share"]
    lo, hi = wilson(0.02, 500)
    assert schedule.value == pytest.approx(2.0)
    assert schedule.spread == pytest.approx(100 * (hi - lo))
    assert schedule.spread_basis == ["interval"]
    row = comparison.delta("prefix-caching-hash-algo=xxhash", "s", "schedule_share")
    assert row.delta == pytest.approx(0.0) and row.within_spread is True
    assert row.delta_pct is None  # a share changes in points


def test_a_loop_share_beyond_its_interval_is_a_change(tmp_path):
    sweep = make_hand_made_sweep(tmp_path / "sweep", xxhash_schedule=0.10)
    row = analyse_sweep(sweep).delta("prefix-caching-hash-algo=xxhash", "s", "schedule_share")
    widths = [100 * (hi - lo) for lo, hi in (wilson(0.02, 500), wilson(0.10, 500))]
    assert row.noise == pytest.approx(max(widths))  # 5.3 pt, the 10% share's
    assert row.delta == pytest.approx(8.0) and row.within_spread is False
    near = make_hand_made_sweep(tmp_path / "near", xxhash_schedule=0.03)
    row = analyse_sweep(near).delta("prefix-caching-hash-algo=xxhash", "s", "schedule_share")
    assert row.delta == pytest.approx(1.0) and row.within_spread is True  # 1 pt: inside


def test_claims_of_hand_made_runs(hand_made_sweep):
    claims = {c.claim: c for c in analyse_sweep(hand_made_sweep).claims}
    scheduling_ = claims["scheduling"]
    assert scheduling_.decided and scheduling_.data["schedule"] == pytest.approx(0.02)
    assert scheduling_.sentence.startswith("Not supported")
    assert not claims["async_scheduling"].decided
    assert "did not vary async-scheduling" in claims["async_scheduling"].sentence
    # all on the pool
    assert claims["tokenization"].data["tokenize_pct_of_core"] == pytest.approx(10.0)
    assert not claims["gil"].decided and "--pyspy-gil" in claims["gil"].sentence
    hashing_ = claims["hashing"]
    assert hashing_.data["shares"] == pytest.approx(
        {"sha256": 100 * 0.03 / 0.85, "xxhash": 100 * 0.01 / 0.83}
    )
    assert hashing_.sentence.startswith("Not negligible")  # 3.5% is past the 2% line
    text = render_sweep(hand_made_sweep.info(), analyse_sweep(hand_made_sweep))
    assert "## What the study claimed, and what this server shows" in text
    assert "| time to headers (ms) | 12.0 ±2.0 | 21.0 ±1.0; +9.0 (**beyond spread**) |" in text
    assert "| scheduling + KV cache, of the engine loop (%) | 2.0% ±" in text
    assert "+0.0 pt (inside spread)" in text


def _config(share=None, loop=None, gil_rows=()):
    metrics = {"prefix_hash_share": MetricValue(value=share)}
    return Configuration(
        name="c",
        scenarios={
            "s": ConfigScenario(
                metrics=metrics | {"queue_ms": MetricValue()}, engine_loop=loop, gil=list(gil_rows)
            )
        },
    )


@pytest.mark.parametrize(
    ("share", "negligible"),
    [(HASHING_NEGLIGIBLE_PCT - 0.1, True), (HASHING_NEGLIGIBLE_PCT, False), (3.5, False)],
)
def test_hashing_on_each_side_of_its_line(share, negligible):
    claim = hashing([], _config(share=share))
    start = "Supported" if negligible else "Not negligible"
    assert claim.decided and claim.sentence.startswith(start)


@pytest.mark.parametrize(("wait", "long"), [(GIL_WAIT_LONG - 0.01, False), (GIL_WAIT_LONG, True)])
def test_gil_wait_on_each_side_of_its_line(wait, long):
    row = GilRow(
        role="api_server",
        process="api_server 1",
        thread="MainThread",
        busy=0.5,
        held=0.4,
        wait=wait,
    )
    claim = gil(_config(gil_rows=[row]))
    assert claim.sentence.startswith("Yes" if long else "Not here")


@pytest.mark.parametrize(
    ("samples", "schedule", "worker_wait", "start"),
    [
        (99, 0.02, 0.8, "Too few samples"),  # under MIN_SAMPLES
        (100, 0.02, 0.8, "Not supported"),  # waits 40x its scheduling
        (100, 0.02, 0.11, "Not supported"),  # 5.5x: past the line
        (100, 0.02, 0.10, "Partly"),  # 5x, not past it: scheduling is a sizeable share
    ],
)
def test_scheduling_on_each_side_of_its_lines(samples, schedule, worker_wait, start):
    loop = EngineLoop(
        worker_wait=worker_wait, schedule=schedule, ipc=0.0, busy=0.9, samples=samples
    )
    assert scheduling(_config(loop=loop)).sentence.startswith(start)


def test_a_sweep_json_before_versions_reads(tmp_path):
    """data/sweep-v1.json: the hand-made sweep's sweep.json as the code before versions wrote
    it (no format_version, half_spread, spread_basis or noise)."""
    raw = orjson.loads((DATA / "sweep-v1.json").read_bytes())
    assert "format_version" not in raw
    old = Sweep.load(DATA / "sweep-v1.json")
    assert old.configurations == [
        "prefix-caching-hash-algo=sha256",
        "prefix-caching-hash-algo=xxhash",
    ]
    assert [s.status for s in old.steps] == ["ok", "ok"]
    comparison = old.comparison
    metric = comparison.configurations[0].scenarios["s"].metrics["http_overhead_ms"]
    assert (metric.value, metric.spread, metric.half_spread) == (12.0, 4.0, None)
    claims = {c.claim: c for c in comparison.claims}
    assert claims["hashing"].sentence.startswith("Not negligible")
    assert summary_lines(comparison)[0] == "prefix-caching-hash-algo=sha256: measured"
    text = render_sweep(old, comparison)
    assert "| time to headers (ms) | 12.0 | 21.0; +9.0 (**beyond spread**) |" in text
    # a sweep directory with a version-1 sweep.json is analysed again as version 2
    sweep = make_hand_made_sweep(tmp_path / "sweep")
    shutil.copy(DATA / "sweep-v1.json", sweep.info_path)
    assert analyse_sweep(sweep).baseline == "prefix-caching-hash-algo=sha256"
    assert orjson.loads(sweep.info_path.read_bytes())["format_version"] == 2


def test_an_unknown_sweep_version_is_one_line(tmp_path):
    path = tmp_path / "sweep.json"
    raw = orjson.loads((DATA / "sweep-v1.json").read_bytes()) | {"format_version": 9}
    path.write_bytes(orjson.dumps(raw))
    with pytest.raises(CputaxError) as err:
        SweepDir(tmp_path).info()
    assert "\n" not in str(err.value)
    assert "Sweep format version 9; this cputax reads 1, 2" in str(err.value)


def test_failed_steps_round_trip(tmp_path):
    sweep = Sweep(
        profile="p.toml",
        target="vllm",
        configurations=["a", "b"],
        steps=[
            Step(configuration="a", folder="a", status="ok", args=["--x", "1"]),
            Step(
                configuration="b",
                folder="b",
                status="failed",
                message="bad value",
                log_tail=["error: bad value"],
            ),
        ],
    )
    sweep.dump(tmp_path / "sweep.json")
    assert Sweep.load(tmp_path / "sweep.json") == sweep


# --- a real sweep -------------------------------------------------------------------------------
PROFILE = """\
[defaults]
max_tokens = 16
batches = 2
warmup = 1

[[scenario]]
name = "conc4_1k"
concurrency = 4
context_tokens = 1000
"""


@pytest.mark.slow
@pytest.mark.local
@needs_vllm
def test_a_sweep_of_the_embedded_vllm_with_a_refused_value(tmp_path):
    (tmp_path / "p.toml").write_text(PROFILE)
    out = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "sweep",
            "--profile",
            str(tmp_path / "p.toml"),
            "--vary",
            "prefix-caching-hash-algo=sha256,xxhash,bogus",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # one configuration did not run
    info = orjson.loads((out / "sweep.json").read_bytes())
    outcome = {s["configuration"]: s for s in info["steps"]}
    assert outcome["prefix-caching-hash-algo=sha256"]["status"] == "ok"
    assert outcome["prefix-caching-hash-algo=xxhash"]["status"] == "ok"
    refused = outcome["prefix-caching-hash-algo=bogus"]
    assert refused["status"] == "failed" and "invalid choice: 'bogus'" in refused["message"]
    assert "prefix-caching-hash-algo=bogus: vllm exited with status 2 while starting" in proc.stderr
    for folder in ("prefix-caching-hash-algo-sha256", "prefix-caching-hash-algo-xxhash"):
        summary = orjson.loads((out / folder / "summary.json").read_bytes())
        assert summary["scenarios"][0]["errors"] == 0
        assert (out / folder / "pyspy" / "attribution.json").exists()
        run = orjson.loads((out / folder / "run.json").read_bytes())
        assert f"--prefix-caching-hash-algo {folder.rsplit('-', 1)[1]}" in " ".join(
            run["server"]["command"]
        )
    text = (out / "sweep.md").read_text()
    assert "prefix-caching-hash-algo=xxhash" in text and "## What the study claimed" in text
    assert "(LMCache) prefix hashing is negligible" in text
    assert (out / "plots" / "sweep_prefix-caching-hash-algo.png").exists()
