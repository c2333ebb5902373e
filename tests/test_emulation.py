"""The emulated GPU's parts that need no server: timing presets, step records, the
`emulated` telemetry source, the bubbles between steps, the report's lines."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import msgspec
import pytest

from cputax.analysis.correlate import gpu_stalls, pending_states, request_phases
from cputax.analysis.emulated import scenario_bubbles
from cputax.analysis.timeline import gpu_busy, read_telemetry
from cputax.emulation import StepRecord, load_timing, preset_names, read_steps
from cputax.emulation.plugin import ARCHITECTURE, EMULATE_ENV
from cputax.emulation.steps import StepLog
from cputax.errors import CputaxError
from cputax.records import RequestRecord, RequestTable
from cputax.report.emulated import emulated_banner, emulated_section
from cputax.report.markdown import study_table
from cputax.results.correlation import CorrelationResult, Scenario
from cputax.results.summary import ScenarioSummary, Summary
from cputax.telemetry.emulated import EmulatedPoller

MS = 1_000_000
S = 1_000_000_000
PRESETS = ("h100-llama3.1-8b", "h200-llama3.1-70b-tp4", "study", "infinite")


def test_every_preset_loads_and_records_every_coefficient():
    assert set(PRESETS) <= set(preset_names())
    for name in PRESETS:
        record = load_timing(name).record()
        assert record["source"] == name and record["name"] == name
        for key in (
            "peak_flops",
            "mem_bandwidth",
            "flops_efficiency",
            "bandwidth_efficiency",
            "params",
            "active_params",
            "kv_bytes_per_token",
            "step_overhead_s",
            "kv_blocks",
            "kv_tokens",
        ):
            assert key in record, (name, key)
        assert record["kv_blocks"] > 1000  # every preset's GPU memory holds a real KV cache


def test_h100_decode_step_is_about_5_ms_and_grows_with_batch_and_context():
    h100 = load_timing("h100-llama3.1-8b")
    one = h100.step_s([1], [1024])
    assert 0.004 < one < 0.0065  # vLLM's CPU-overhead posts: ~5 ms of GPU per decode step
    assert (
        h100.step_s([1] * 64, [8192] * 64) > 1.5 * one
    )  # 64 x 8k of KV read beside 16 GB of weights
    assert h100.step_s([8192], [8192]) > 20 * one  # a long prefill is compute bound


def test_gpu_speed_scales_and_infinite_is_zero():
    base = load_timing("h100-llama3.1-8b")
    fast = load_timing("h100-llama3.1-8b", gpu_speed=4)
    assert fast.step_s([1] * 8, [2000] * 8) == pytest.approx(base.step_s([1] * 8, [2000] * 8) / 4)
    assert load_timing("h100-llama3.1-8b", gpu_speed=math.inf).step_s([512], [512]) == 0.0
    assert load_timing("infinite").step_s([1] * 32, [30000] * 32) == 0.0
    assert load_timing("infinite", 1.0).kv_blocks() == base.kv_blocks()  # same memory, same KV
    assert json.loads(fast.to_env())["gpu_speed"] == 4.0
    assert type(fast).from_env(load_timing("study", math.inf).to_env()).infinite


# The study's single-request rows (../shared/seed/): prompt tokens (its "32k" and "100k"
# were really 19.7k and 58.6k), prefill ms, decode ms over 64 output tokens
STUDY_ROWS = [(1000, 41, 1780), (8000, 124, 3142), (19704, 682, 7736), (58560, 3555, 20792)]
CHUNK = 8192  # vLLM's chunked prefill on a GPU server


def test_study_preset_reproduces_the_studys_published_times():
    study = load_timing("study")
    for tokens, prefill_ms, decode_ms in STUDY_ROWS:
        done, prefill = 0, 0.0
        while done < tokens:
            q = min(CHUNK, tokens - done)
            done += q
            prefill += study.step_s([q], [done])
        decode = sum(study.step_s([1], [tokens + k]) for k in range(1, 64))
        assert decode * 1e3 == pytest.approx(decode_ms, rel=0.25), tokens
        if (
            tokens > 10_000
        ):  # the short prompts' prefill is dominated by what the study timed around it
            assert prefill * 1e3 == pytest.approx(prefill_ms, rel=0.15), tokens


def test_a_copied_preset_file_loads_and_bad_ones_are_one_line(tmp_path):
    from importlib import resources

    text = (resources.files("cputax.emulation") / "presets" / "h100-llama3.1-8b.toml").read_text()
    mine = tmp_path / "mine.toml"
    mine.write_text(text.replace("step_overhead_s = 0.0002", "step_overhead_s = 0.0102"))
    edited = load_timing(str(mine))
    assert edited.source == str(mine)
    assert edited.step_s([1], [100]) == pytest.approx(
        load_timing("h100-llama3.1-8b").step_s([1], [100]) + 0.01
    )
    (tmp_path / "typo.toml").write_text(text.replace("peak_flops", "peak_flop"))
    with pytest.raises(CputaxError, match="unknown keys peak_flop"):
        load_timing(str(tmp_path / "typo.toml"))
    with pytest.raises(CputaxError, match="not a preset"):
        load_timing("a100-nothing")
    with pytest.raises(CputaxError, match="no such file"):
        load_timing(str(tmp_path / "missing.toml"))
    (tmp_path / "big.toml").write_text(text.replace("params = 8.03e9\n", "params = 803e9\n"))
    with pytest.raises(CputaxError, match="do not fit"):
        load_timing(str(tmp_path / "big.toml")).kv_blocks()
    with pytest.raises(CputaxError, match="gpu-speed"):
        load_timing("study", gpu_speed=0)


def step(t0_ms, t1_ms, model_ms=None, cpu_us=50):
    model = (t1_ms - t0_ms) if model_ms is None else model_ms
    return StepRecord(
        int(t0_ms * MS), int(t1_ms * MS), int(model * MS), 0, 1, 100, 1, cpu_us * 1000
    )


def test_step_log_round_trip_leaves_a_torn_line_for_later(tmp_path):
    path = tmp_path / "emulated-gpu.jsonl"
    log = StepLog(str(path))
    log.write(step(0, 5))
    log.write(step(7, 12))
    with open(path, "ab") as fh:
        fh.write(b'{"t0_ns": 14')  # the writer is mid-line
    got = list(read_steps(path))
    assert [r for r, _ in got] == [step(0, 5), step(7, 12)]
    offset = got[-1][1]
    with open(path, "ab") as fh:
        fh.write(b"000000}\n")  # not a step record: skipped
    assert list(read_steps(path, offset)) == []
    StepLog(None).write(step(0, 1))  # no path: nothing written, no error
    assert list(read_steps(tmp_path / "absent.jsonl")) == []


def test_emulated_source_turns_steps_into_busy_and_idle_windows(tmp_path):
    path = tmp_path / "emulated-gpu.jsonl"
    poller = EmulatedPoller(path)
    poller.open()
    poller._last_end = 0  # as if opened at t = 0
    log = StepLog(str(path))
    for s in (step(2, 7), step(9, 14), step(20, 25)):
        log.write(s)
    samples = poller.poll()
    assert [(s.t0_ns // MS, s.t_ns // MS, s.busy) for s in samples] == [
        (0, 2, 0.0),
        (2, 7, 100.0),
        (7, 9, 0.0),
        (9, 14, 100.0),
        (14, 20, 0.0),
        (20, 25, 100.0),
    ]
    assert poller.poll() == []
    tail = poller.drain()
    assert tail[-1].t0_ns == 25 * MS and tail[-1].busy == 0.0
    meta = poller.close()
    assert meta["steps"] == 3 and meta["series"]["0"]["steps"]["resolution_ms"] == 1.0


def req(start, sent, headers, first, last, end):
    return RequestRecord(
        scenario="s",
        ok=True,
        t_start=int(start * MS),
        t_sent=int(sent * MS),
        t_headers=int(headers * MS),
        t_first_token=int(first * MS),
        t_last_token=int(last * MS),
        t_end=int(end * MS),
    )


def _steps_every(period_ms: float, busy_ms: float, until_ms: float) -> list[StepRecord]:
    out, t = [], 0.0
    while t + busy_ms <= until_ms:
        out.append(step(t, t + busy_ms))
        t += period_ms
    return out


def test_correlation_busy_and_bubbles_agree_with_the_steps(tmp_path):
    # a step of 5 ms every 7 ms over 1 s; one request at the engine from 100 to 900 ms
    steps = _steps_every(7.0, 5.0, 1000.0)
    table = RequestTable.from_records([req(80, 90, 100, 120, 900, 905)])
    window = (0, 1000 * MS)
    path = tmp_path / "emulated-gpu.jsonl"
    log = StepLog(str(path))
    for s in steps:
        log.write(s)
    poller = EmulatedPoller(path)
    poller.open()
    poller._last_end = 0  # as if opened at t = 0
    samples = poller.poll() + poller.drain()
    gpu = gpu_busy(read_telemetry(samples), {"emulated": poller.close()})
    assert gpu is not None and gpu.backend == "emulated"
    states = pending_states(request_phases(table).clip(*window))
    stalls, _ = gpu_stalls(window, states, gpu, {})
    exact = sum(s.t1_ns - s.t0_ns for s in steps) / (1000 * MS) * 100
    assert stalls.busy_pct == pytest.approx(exact, abs=2.0)
    bubbles = scenario_bubbles(window, steps, states, {})
    assert bubbles.busy_pct == pytest.approx(exact)
    # gaps of 2 ms between 100 and 900 ms, each with the request at the engine
    inside = [
        b
        for a, b in zip(steps, steps[1:], strict=False)
        if a.t1_ns >= 100 * MS and b.t0_ns <= 900 * MS
    ]
    assert bubbles.bubbles >= len(inside)
    assert bubbles.bubble_ms.p50 == pytest.approx(2.0)
    assert bubbles.bubble_pct == pytest.approx(100 * 2 * len(inside) / 1000, abs=0.5)
    assert bubbles.step_cpu_pct == pytest.approx(1.0)  # 50 µs of CPU per 5 ms step
    assert bubbles.bubble_split == {
        "unattributed (no py-spy data)": pytest.approx(bubbles.bubble_s)
    }
    # the report's split: its largest parts, % of the split's whole
    assert [(s.name, s.pct) for s in bubbles.bubble_split_top] == [
        ("unattributed (no py-spy data)", pytest.approx(100.0))
    ]


def test_a_real_gpus_samples_do_not_mix_with_the_emulated_ones():
    samples = [
        {
            "t_ns": 10 * MS,
            "t0_ns": 0,
            "src": "emulated",
            "kind": "emulated",
            "dev": 0,
            "busy": 100.0,
        },
        {"t_ns": 10 * MS, "src": "nvidia", "kind": "util", "dev": 0, "gpu": 3},
    ]
    gpu = gpu_busy(read_telemetry(samples), {"emulated": {}, "nvidia": {}})
    assert list(gpu.intervals) == [(0, "emulated")]


def test_report_says_the_gpu_is_emulated_and_puts_bubbles_beside_cpu_pct():
    info = {
        "target": {"kind": "embedded", "emulated_gpu": load_timing("h100-llama3.1-8b").record()}
    }
    banner = "\n".join(emulated_banner(info))
    assert banner.startswith("> **The GPU is emulated; the CPU side is real.**")
    assert "h100-llama3.1-8b" in banner and "26,674 blocks" in banner
    assert emulated_banner({"target": {"kind": "embedded"}}) == []
    scenario = msgspec.convert(
        {
            "name": "c1",
            "concurrency": 1,
            "context_tokens": 1000,
            "prompt_tokens_mean": 1000,
            "mean_ms": dict.fromkeys(("http_overhead", "prefill", "decode", "total"), 1.0),
            "p50_ms": dict.fromkeys(("http_overhead", "prefill", "decode", "total"), 1.0),
            "p99_ms": dict.fromkeys(("http_overhead", "prefill", "decode", "total"), 1.0),
            "cpu_pct": 2.5,
            "gpu_pct": 97.5,
            "errors": 0,
            "requests": 4,
            "gpu_bubble_pct": 31.25,
        },
        ScenarioSummary,
    )
    header, _, row = study_table([scenario]).splitlines()
    cells = [c.strip() for c in header.split("|")]
    values = [c.strip() for c in row.split("|")]
    assert values[cells.index("GPU idle, work pending %")] == "31.2%"
    assert values[cells.index("CPU%")] == "2.5%"
    em = scenario_bubbles(
        (0, 100 * MS), _steps_every(7.0, 5.0, 100.0), [(0, 100 * MS, "engine")], {}
    )
    correlation = CorrelationResult(scenarios=[Scenario(name="c1", wall_s=0.1, emulated_gpu=em)])
    section = emulated_section(Summary(scenarios=[scenario]), correlation)
    assert "| c1 |" in section and "2.5%" in section


@pytest.mark.slow
@pytest.mark.local
def test_plugin_is_inert_unless_asked():
    """vLLM's own loader runs every installed plugin; cputax's registers nothing unless its
    environment variable is set (and then the emulated architecture)."""
    code = (
        "from vllm.plugins import load_general_plugins; from vllm import ModelRegistry; "
        f"load_general_plugins(); print({ARCHITECTURE!r} in ModelRegistry.get_supported_archs())"
    )
    env = {k: v for k, v in os.environ.items() if k != EMULATE_ENV}
    pytest.importorskip("vllm")
    off = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    on = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, EMULATE_ENV: load_timing("infinite").to_env()},
    )
    assert off.stdout.strip().splitlines()[-1] == "False", off.stderr[-2000:]
    assert on.stdout.strip().splitlines()[-1] == "True", on.stderr[-2000:]


def _config(name: str, totals: dict[str, float]):
    from cputax.results.sweep import ConfigScenario, Configuration, MetricValue

    scenarios = {
        n: ConfigScenario(
            metrics={"total_ms": MetricValue(value=t)}, concurrency=c, context_tokens=1000
        )
        for c, (n, t) in enumerate(totals.items(), start=1)
    }
    return Configuration(name=name, scenarios=scenarios)


def test_cpu_floor_claim_from_a_gpu_speed_sweep():
    from cputax.analysis.claims import cpu_floor
    from cputax.workload.sweep import configurations, parse_vary

    knobs, _ = parse_vary("gpu-speed=1,4,inf", {})
    configs = configurations([knobs])
    assert [c.args() for c in configs] == [(), (), ()]  # not a server flag: cputax's own knob
    assert [c.own_options()["gpu_speed"] for c in configs] == [1.0, 4.0, math.inf]
    row = cpu_floor(
        [
            _config("gpu-speed=1", {"single": 1000.0, "conc8": 2000.0}),
            _config("gpu-speed=4", {"single": 400.0, "conc8": 900.0}),
            _config("gpu-speed=inf", {"single": 100.0, "conc8": 240.0}),
        ]
    )
    assert row.decided and row.data["left_pct"] == {"single": 10.0, "conc8": 12.0}
    assert "At conc8, an infinitely fast GPU leaves 12%" in row.sentence
    assert "as the study says" in row.sentence
    higher = cpu_floor(
        [_config("gpu-speed=1", {"s": 100.0}), _config("gpu-speed=inf", {"s": 60.0})]
    )
    assert "a higher floor than the study's" in higher.sentence
    assert not cpu_floor([_config("api-server-count=1", {"s": 1.0})]).decided
    with pytest.raises(CputaxError, match="not a number"):
        configurations([parse_vary("gpu-speed=1,fast", {})[0]])[1].own_options()


def test_which_gpu_the_embedded_server_gets():
    from cputax.servers import get
    from cputax.session import DEFAULT_EMULATION, RunOptions, emulation_for

    vllm, transformers = get("vllm"), get("transformers")
    assert emulation_for(RunOptions(), vllm).source == DEFAULT_EMULATION == "h100-llama3.1-8b"
    assert emulation_for(RunOptions(emulate_gpu="study", gpu_speed=2), vllm).gpu_speed == 2
    assert emulation_for(RunOptions(emulate_gpu="none"), vllm) is None
    assert emulation_for(RunOptions(), transformers) is None  # only vLLM hosts it
    with pytest.raises(CputaxError, match="no meaning with --emulate-gpu none"):
        emulation_for(RunOptions(emulate_gpu="none", gpu_speed=4), vllm)
    with pytest.raises(CputaxError, match="cannot host"):
        emulation_for(RunOptions(gpu_speed=4), transformers)


def test_emulate_gpu_against_an_endpoint_is_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "run",
            "--endpoint",
            "http://127.0.0.1:9",
            "--emulate-gpu",
            "study",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("cputax run: error: --emulate-gpu and --gpu-speed apply to the embedded vLLM")
    )
