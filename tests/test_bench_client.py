"""The peer benchmark in its shortest mode: it runs every client it can and prints its table.
It asserts no speed (a shared machine); the figures are in the README, with the command."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_client.py"


@pytest.mark.slow
def test_the_peer_benchmark_produces_its_table(tmp_path):
    out = tmp_path / "peers.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = orjson.loads(out.read_bytes())
    clients = {r["client"] for r in result["peers"]}
    expected = {"cputax"} | ({"vllm-bench"} if importlib.util.find_spec("vllm") else set())
    assert clients == expected
    for row in result["peers"]:
        assert {"client", "streams", "cpu_us_per_chunk", "ttft_error_ms_p50", "ttft_error_ms_p99",
                "max_chunks_per_s"} <= set(row) and row["errors"] == 0
    assert {s["client"] for s in result["skipped"]} >= {"aiperf", "guidellm"} - {r["client"] for r in result["peers"]}
    assert "Load clients side by side" in proc.stdout and "max chunk/s" in proc.stdout
