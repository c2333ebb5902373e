"""The run's self-checks on the embedded vLLM: closed loop up to 24 streams and Poisson
arrivals keep every invariant on every record; a starved client is caught (its scenarios
marked, CPU% withheld, exit 1)."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from conftest import needs_vllm

from cputax.analysis.invariants import check
from cputax.records import read_request_table

pytestmark = [pytest.mark.slow, pytest.mark.local, needs_vllm]

PROFILE = """
[defaults]
max_tokens = 16
warmup = 1

[[scenario]]
name = "closed1_1k"
concurrency = 1
context_tokens = 1000
batches = 2

[[scenario]]
name = "closed8_1k"
concurrency = 8
context_tokens = 1000
batches = 2

[[scenario]]
name = "closed24_1k"
concurrency = 24
context_tokens = 1000
batches = 2

[[scenario]]
name = "poisson12_1k"
concurrency = 12
context_tokens = 1000
arrival = "poisson"
rate = 6
duration_s = 4
"""
# A thread of the client's own process that holds the GIL in one C call (a sort) for
# about 60 ms at a time while a scenario's load runs (not during start-up, nor while the
# report is drawn: matplotlib under such a hog takes many minutes): the event loop cannot
# stamp, write or read meanwhile.
HOG = """
import random, sys, threading
import cputax.client.loadgen as loadgen
data = [random.random() for _ in range(300_000)]
go = threading.Event()

def hog():
    while go.wait():
        sorted(data)

threading.Thread(target=hog, daemon=True).start()
real = loadgen.run_scenario

async def run_scenario(*args, **kwargs):
    go.set()
    try:
        return await real(*args, **kwargs)
    finally:
        go.clear()

loadgen.run_scenario = run_scenario
from cputax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cputax_run(
    endpoint: str, profile, out, *, hog: bool = False
) -> subprocess.CompletedProcess[str]:
    code = ["-c", HOG] if hog else ["-m", "cputax.cli"]
    return subprocess.run(
        [
            sys.executable,
            *code,
            "run",
            "--endpoint",
            endpoint,
            "--profile",
            str(profile),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_closed_loop_and_poisson_keep_every_invariant(vllm, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    proc = cputax_run(vllm.endpoint, profile, tmp_path / "run")
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    for s in summary["scenarios"]:
        assert s["invariants"]["ok"], (s["name"], s["invariants"])
        assert s["p99_ms"]["serialize"] <= 5.0 and s["client_lag_ms"]["p99"] <= 5.0, s["name"]
    table = read_request_table(tmp_path / "run" / "requests.jsonl")
    assert len(table) == sum(s["requests"] for s in summary["scenarios"])
    assert [s["requests"] for s in summary["scenarios"][:3]] == [2, 16, 48]
    assert not any(mask.any() for mask in check(table).values())
    poisson = next(s for s in summary["scenarios"] if s["name"] == "poisson12_1k")
    assert poisson["schedule_lag_ms"]["requests"] == poisson["requests"]
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_starved_client_is_caught(vllm, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE.split('[[scenario]]\nname = "closed24_1k"')[0])  # closed1, closed8
    proc = cputax_run(vllm.endpoint, profile, tmp_path / "run", hog=True)
    assert proc.returncode == 1
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert [s["name"] for s in summary["scenarios"]] == ["closed1_1k", "closed8_1k"]
    for s in summary["scenarios"]:
        assert not s["invariants"]["ok"] and s["invariants"]["broken"] > 0, s["name"]
        assert s["cpu_pct"] is None and s["withheld"], s["name"]
        assert f"{s['name']}: " in proc.stderr and "CPU% is withheld" in proc.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.count("withheld") >= 4 and "invalid" in report
