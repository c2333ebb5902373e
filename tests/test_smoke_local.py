"""The main job end to end: `cputax run` with the smoke profile against the embedded target.

Starts the real `transformers serve` (tiny random model, this CPU), runs every smoke
scenario and checks what a user reads: all requests finished, prompts on size,
output lengths as asked, phases that add up. About two minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import orjson
import pytest

from cputax.records import read_requests
from cputax.run import resolve_profile
from cputax.targets import local
from cputax.workload.profiles import load_profile

HAVE_LOCAL = all(importlib.util.find_spec(m) is not None for m in local.LOCAL_MODULES)

pytestmark = [
    pytest.mark.local,
    pytest.mark.slow,
    pytest.mark.skipif(not HAVE_LOCAL, reason=f"needs the [local] extra: {local.INSTALL_HINT}"),
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    proc = subprocess.run([sys.executable, "-m", "cputax.cli", "run", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_profile_runs_clean(smoke_run):
    out, proc = smoke_run
    scenarios = load_profile(resolve_profile(None))
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert [s["name"] for s in summary["scenarios"]] == [s.name for s in scenarios]
    for planned, got in zip(scenarios, summary["scenarios"], strict=True):
        assert got["requests"] == planned.planned_requests and got["errors"] == 0, got["error_kinds"]
        # sized with the local tokenizer, corrected by the server's usage count of the warm-up
        assert not got["prompt_tokens_flagged"], (got["name"], got["prompt_tokens_mean"])
        assert got["output_tokens_mean"] == planned.max_tokens
        mean = got["mean_ms"]
        assert all(mean[k] > 0 for k in ("serialize", "http_overhead", "prefill", "decode", "total"))
        parts = mean["serialize"] + mean["http_overhead"] + mean["prefill"] + mean["decode"]
        assert parts <= mean["total"] * 1.001
        assert got["server"] is None  # transformers serve exports no /metrics: absent, not zero
    assert "cputax: per-request decomposition" in proc.stdout


def test_smoke_records_and_report(smoke_run):
    out, _ = smoke_run
    records = read_requests(out / "requests.jsonl")
    assert records and all(r.ok and r.t_first_token > r.t_headers > r.t_sent for r in records)
    report = (out / "report.md").read_text()
    assert "(embedded)" in report and "none exported" in report
    info = orjson.loads((out / "run.json").read_bytes())
    assert info["target"]["kind"] == "embedded"
    # the embedded server is stopped at the end of the run
    pid = info["target"]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
