"""report.html, the plots and the telemetry section, from fixture run directories.

The fixture run drives the calibration stub over real HTTP with telemetry on. There is
no GPU here: its NVIDIA telemetry comes from tests/fakegpu/pynvml.py (a stand-in busy
the first half of every second) on the telemetry process's PYTHONPATH.
"""

import os
from pathlib import Path

import matplotlib.image
import orjson
import pytest

from cputax.commands.run import run
from cputax.rundir import RunDir
from cputax.session import RunOptions, rebuild_report
from cputax.targets.stub import StubConfig, StubServer
from cputax.telemetry.runner import TelemetryConfig

FAKES = Path(__file__).parent / "fakegpu"
PROFILE = """
[defaults]
max_tokens = 16
batches = 3
warmup = 1
context_tokens = 600
[[scenario]]
name = "single"
concurrency = 1
[[scenario]]
name = "conc2"
concurrency = 2
[[scenario]]
name = "conc4"
concurrency = 4
"""
SCENARIOS = ("single", "conc2", "conc4")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html")
    (tmp / "p.toml").write_text(PROFILE)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(FAKES)  # the telemetry child imports the stand-in pynvml
    try:
        config = StubConfig(headers_delay_ms=20, first_token_delay_ms=60, inter_token_delay_ms=10)
        with StubServer(config, process=True) as stub:
            run(
                RunOptions(
                    endpoint=stub.url,
                    profile=tmp / "p.toml",
                    out=tmp / "run",
                    telemetry=TelemetryConfig(gpu="nvidia", host_interval_ms=50),
                )
            )
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    return tmp / "run"


def test_html_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    assert html.startswith("<!doctype html>")
    assert html.count("data:image/png;base64,") == 2 + len(
        SCENARIOS
    )  # bars, HTTP OH, one timeline each
    for external in ("<script", "<link", 'src="http', "src='http"):
        assert external not in html
    assert "<table>" in html and "GPU stalls" in html and "Server CPU per process" in html


def test_pngs_are_written_and_readable(run_dir):
    names = {p.name for p in (run_dir / "plots").glob("*.png")}
    assert names == {"decomposition.png", "http_overhead_vs_concurrency.png"} | {
        f"timeline_{s}.png" for s in SCENARIOS
    }
    for p in (run_dir / "plots").glob("*.png"):
        assert matplotlib.image.imread(p).shape[0] > 200


def test_correlation_with_gpu_telemetry(run_dir):
    corr = orjson.loads((run_dir / "correlation.json").read_bytes())
    info = orjson.loads((run_dir / "run.json").read_bytes())
    assert info["monitors"]["telemetry"]["nvidia"]["devices"][0]["name"] == "NVIDIA H200"
    assert [s["name"] for s in corr["scenarios"]] == list(SCENARIOS)
    for s in corr["scenarios"]:
        g = s["gpu"]
        assert g["resolution_ms"] == 100.0 and "GPM" in g["source"]
        assert 0 <= g["stall_pct"] <= g["idle_pct"] <= 100
        assert g["coverage_pct"] > 90
        server = [p for p in s["host"]["processes"] if p["role"] == "server"]
        assert server and server[0]["cpu_pct"] > 0
    # the stand-in is busy half of each second; over all scenarios its busy share is about half
    wall = sum(s["wall_s"] for s in corr["scenarios"])
    busy = sum(s["gpu"]["busy_pct"] * s["wall_s"] for s in corr["scenarios"]) / wall
    assert 20 < busy < 80
    report = (run_dir / "report.md").read_text()
    assert "| single |" in report.split("### GPU stalls")[1]
    assert "100 ms / ±" in report  # resolution and alignment beside the numbers


def test_report_rebuilds_html_and_links_flamegraphs(run_dir):
    (run_dir / "pyspy").mkdir(exist_ok=True)
    (run_dir / "pyspy" / "server.svg").write_text("<svg/>")
    (run_dir / "report.html").unlink()
    (run_dir / "correlation.json").unlink()
    results = rebuild_report(RunDir(run_dir))
    html = (run_dir / "report.html").read_text()
    assert 'href="pyspy/server.svg"' in html
    assert results.views == ["pyspy/server.svg"]
    assert (run_dir / "correlation.json").exists()


def test_report_of_a_run_without_telemetry(run_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("run.json", "requests.jsonl", "windows.jsonl"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    info = orjson.loads((bare / "run.json").read_bytes())
    info.pop("monitors")
    (bare / "run.json").write_bytes(orjson.dumps(info))
    rebuild_report(RunDir(bare))
    html = (bare / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 + len(
        SCENARIOS
    )  # timelines still show requests in flight
    assert "GPU stalls" not in html and "none in this run" in html
