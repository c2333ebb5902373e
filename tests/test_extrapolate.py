"""`cputax extrapolate`: the front-end model fitted to synthetic run directories with known
answers, and the study's own published numbers reproducing its sub-agent table."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from cputax.analysis.extrapolate import FrontEnd, Point, extrapolate, points_from_run
from cputax.commands.extrapolate import extrapolate as extrapolate_command
from cputax.errors import CputaxError
from cputax.records import write_json
from cputax.rundir import RunDir

SHAPE = [
    (1, 1000),
    (1, 8000),
    (1, 32000),
    (4, 8000),
    (8, 4000),
    (16, 32000),
    (32, 32000),
    (32, 8000),
]


def write_run(path, model: FrontEnd, shape=SHAPE, extra=()):
    """A run directory whose scenarios follow `model` exactly (client and rest linear)."""
    asked, summaries = [], []
    for c, n in shape:
        name = f"conc{c}_{n // 1000}k"
        oh = model(c, n)
        serialize, parse = 0.5 + 0.4 * c, 0.2
        rest = 400 + 0.05 * n + 15 * c
        total = serialize + parse + oh + rest
        asked.append({"name": name, "concurrency": c, "context_tokens": n, "batches": 3})
        summaries.append(
            {
                "name": name,
                "concurrency": c,
                "context_tokens": n,
                "prompt_tokens_mean": float(n),
                "mean_ms": {
                    "serialize": serialize,
                    "http_overhead": oh,
                    "prefill": rest / 2,
                    "decode": rest / 2,
                    "response_parse": parse,
                    "total": total,
                },
                "cpu_pct": 100 * (serialize + parse + oh) / total,
            }
        )
    for name in extra:
        asked.append(
            {
                "name": name,
                "concurrency": 4,
                "context_tokens": 1000,
                "duration_s": 5,
                "batches": None,
            }
        )
        summaries.append({**summaries[0], "name": name, "concurrency": 4})
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "run.json", {"scenarios": asked})
    write_json(path / "summary.json", {"scenarios": summaries})
    return RunDir(path)


def test_recovers_a_queue_with_contention(tmp_path):
    truth = FrontEnd(L=3.0, s0=2.0, s1=0.0015, q=0.3, proportional=False)
    points, left_out = points_from_run(write_run(tmp_path / "r", truth, extra=["open_loop"]))
    assert [p.name for p in points][:2] == ["conc1_1k", "conc1_8k"] and len(points) == len(SHAPE)
    assert left_out == [
        "open_loop: its requests do not arrive as batches (open loop, duration or replay)"
    ]
    result = extrapolate(points, [4, 8], [0, 3, 12], context=32000)
    model = result.model
    assert model.name == "queue with contention"
    p = model.params
    assert p.q == pytest.approx(0.3, abs=0.011)
    assert p.L_ms == pytest.approx(3.0, rel=0.1) and p.s0_ms == pytest.approx(2.0, rel=0.1)
    assert p.s1_us_per_token == pytest.approx(1.5, rel=0.02)
    assert model.fit_rms_pct < 1.0
    row = next(r for r in result.table if r.users == 4 and r.subagents == 12)
    assert row.concurrency == 52 and not row.beyond  # 52 <= 2 x 32
    assert row.http_overhead_ms == pytest.approx(truth(52, 32000), rel=0.03)
    serialize, parse, rest = 0.5 + 0.4 * 52, 0.2, 400 + 0.05 * 32000 + 15 * 52
    oh = truth(52, 32000)
    cpu = 100 * (serialize + parse + oh) / (serialize + parse + oh + rest)
    assert row.cpu_pct == pytest.approx(cpu, abs=0.5)
    beyond = next(r for r in result.table if r.users == 8 and r.subagents == 12)
    assert beyond.concurrency == 104 and beyond.beyond
    assert any("more than 2x the largest measured concurrency (32)" in w for w in result.warnings)


def test_a_pure_queue_is_called_a_queue(tmp_path):
    truth = FrontEnd(L=1.0, s0=4.0, s1=0.002, q=0.0, proportional=False)
    result = extrapolate(points_from_run(write_run(tmp_path / "r", truth))[0], [4], [0, 3])
    assert result.model.name == "queue" and result.model.params.q == 0.0
    assert result.context_tokens == 32000  # default: the largest measured at concurrency > 1
    assert [r.concurrency for r in result.table] == [4, 16]
    assert result.table[1].http_overhead_ms == pytest.approx(truth(16, 32000), rel=0.01)
    assert all(r.measured_range for r in result.table)


def test_one_prompt_size_scales_service_time_with_tokens(tmp_path):
    truth = FrontEnd(L=0.0, s0=0.0, s1=0.004, q=0.0, proportional=True)
    shape = [(1, 4000), (4, 4000), (8, 4000), (16, 4000)]
    result = extrapolate(
        points_from_run(write_run(tmp_path / "r", truth, shape))[0], [4], [3], context=16000
    )
    assert result.model.params.proportional_to_tokens
    assert result.table[0].http_overhead_ms == pytest.approx(truth(16, 16000), rel=0.01)
    assert any("over twice the largest measured" in w for w in result.warnings)


def test_needs_two_concurrency_levels():
    points = [
        Point("a", 4, 1000, 1000, 10.0, 1.0, 100.0, 10.0),
        Point("b", 4, 8000, 8000, 50.0, 1.0, 300.0, 14.0),
    ]
    with pytest.raises(CputaxError, match="two or more concurrency levels"):
        extrapolate(points, [4], [0])


# The study's published HBM table (its section 3.1): concurrency, context, HTTP OH, total, CPU%.
STUDY = [
    (1, 1000, 7, 1828, 0.4),
    (1, 8000, 15, 3282, 0.5),
    (1, 32000, 47, 8465, 0.6),
    (1, 100000, 131, 24479, 0.6),
    (4, 8000, 53, 3291, 1.6),
    (16, 32000, 555, 8885, 6.2),
    (32, 32000, 1130, 9639, 11.6),
    (32, 100000, 3885, 25957, 14.9),
]


def test_reproduces_the_studys_subagent_table_from_its_own_numbers():
    points = [
        Point(f"s{i}", c, n, n, oh, 0.0, total - oh, cpu)
        for i, (c, n, oh, total, cpu) in enumerate(STUDY)
    ]
    result = extrapolate(points, [4, 8], [0, 3, 12], context=32000)
    rows = {(r.users, r.subagents): r for r in result.table}
    assert 20 <= rows[(4, 12)].cpu_pct <= 25  # the study: 20-25%
    assert 30 <= rows[(8, 12)].cpu_pct <= 40  # the study: 30-40%
    assert 5 <= rows[(4, 3)].cpu_pct <= 7.5  # the study: 6.2%
    assert 1500 <= rows[(4, 12)].http_overhead_ms <= 3500  # the study: ~3,000 ms
    assert rows[(8, 12)].beyond and not rows[(4, 12)].beyond
    assert result.model.fit_rms_pct < 10


def test_command_writes_files_and_prints_the_table(tmp_path):
    run_dir = write_run(tmp_path / "r", FrontEnd(2.0, 1.0, 0.001, 0.2, False)).path
    assert extrapolate_command(run_dir, [4], [0, 12]) == 0
    saved = orjson.loads((run_dir / "extrapolation.json").read_bytes())
    assert [r["concurrency"] for r in saved["table"]] == [4, 52]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "extrapolate",
            str(run_dir),
            "--users",
            "4",
            "--subagents",
            "0,12",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| 4 | 12 | 52 |" in proc.stdout and "Model of the front end" in proc.stdout
    assert (run_dir / "extrapolation.md").read_text() == proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "cputax.cli", "extrapolate", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no such run directory" in proc.stderr
