"""`cputax run` end to end over real HTTP against the calibration stub, and `cputax report`."""

import os
import shutil
import subprocess
import sys

import orjson
import pytest
from helpers import expected_exit

from cputax.commands.run import run
from cputax.errors import CputaxError
from cputax.records import read_requests, write_json
from cputax.rundir import RAW_FORMATS, RunDir
from cputax.session import RunOptions
from cputax.targets.stub import StubConfig, StubServer

PROFILE = """
[defaults]
max_tokens = 8
batches = 2
warmup = 1
[[scenario]]
name = "single_2k"
concurrency = 1
context_tokens = 2000
[[scenario]]
name = "conc4_1k"
concurrency = 4
context_tokens = 1000
[[scenario]]
name = "open"
concurrency = 4
context_tokens = 600
duration_s = 1.0
arrival = "burst"
burst_size = 3
burst_every_s = 0.5
"""
HEADERS_MS, FIRST_MS, INTER_MS = 60.0, 80.0, 5.0
# How far the client's phase may be from the stub's account of it: half the smallest
# injected delay (decode, 7 x 5 ms), so that a phase holding another's delay fails
SIDE_BY_SIDE_MS = 7 * INTER_MS / 2


@pytest.fixture(scope="module")
def stub():
    config = StubConfig(
        headers_delay_ms=HEADERS_MS, first_token_delay_ms=FIRST_MS, inter_token_delay_ms=INTER_MS
    )
    with StubServer(config, process=True) as server:
        yield server


@pytest.fixture(scope="module")
def run_dir(stub, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    profile = tmp / "p.toml"
    profile.write_text(PROFILE)
    os.environ["CPUTAX_TEST_KEY"] = "sk-secret-do-not-write-1234"
    out = tmp / "out"
    options = RunOptions(endpoint=stub.url, profile=profile, out=out, api_key_env="CPUTAX_TEST_KEY")
    code = run(options)
    assert code == expected_exit(out)
    return out


def test_every_request_recorded_with_its_scenario(run_dir):
    records = read_requests(run_dir / "requests.jsonl")
    by = {}
    for r in records:
        by.setdefault(r.scenario, []).append(r)
    assert len(by["single_2k"]) == 2 and len(by["conc4_1k"]) == 8
    assert len(by["open"]) == 6  # bursts of 3 at 0 s and 0.5 s within 1 s
    assert all(r.ok and r.error is None for r in records)
    assert {r.batch for r in by["conc4_1k"]} == {0, 1}
    assert all(r.index >= 0 for r in records)  # warm-up requests are not recorded


def test_summary_matches_the_stubs_injected_delays(run_dir):
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    names = [s["name"] for s in summary["scenarios"]]
    assert names == ["single_2k", "conc4_1k", "open"]
    single = summary["scenarios"][0]
    for key in (
        "name",
        "concurrency",
        "context_tokens",
        "requests",
        "errors",
        "prompt_tokens_mean",
        "mean_ms",
        "p50_ms",
        "p99_ms",
        "cpu_pct",
        "gpu_pct",
        "server",
    ):
        assert key in single
    mean, server = single["mean_ms"], single["server"]["mean_ms"]
    injected = {"http_overhead": HEADERS_MS, "prefill": FIRST_MS, "decode": 7 * INTER_MS}
    # The client sees all of the server's request, and a loaded machine only adds to it.
    assert mean["total"] >= server["e2e"] - 1
    late = mean["total"] - sum(injected.values())  # all this machine added, measured here
    # The stub's own account (its metrics): deadlines from the request's arrival, never early.
    assert server["ttft"] >= HEADERS_MS + FIRST_MS - 1
    assert server["prefill"] <= server["ttft"] - HEADERS_MS + 1
    # The client's phases against the stub's, the same events timed side by side (the
    # client's kernel receive stamps): they differ by the delivery only, however late the
    # loaded machine ran the stub; a phase that took in another's delay (35 ms or more) is
    # off by all of it.
    assert single["clock"] == "kernel"
    for phase in ("prefill", "decode"):
        assert mean[phase] == pytest.approx(server[phase], abs=SIDE_BY_SIDE_MS), (phase, server)
    # sent before the stub had it: all of the headers' delay, and no more than all the
    # lateness there was
    assert HEADERS_MS - 1 <= mean["http_overhead"] <= HEADERS_MS + max(late, 0) + 10, (mean, late)
    # the stub counts prompts with the same tokenizer and template: sized on target
    assert abs(single["prompt_tokens_mean"] - 2000) <= 20 and not single["prompt_tokens_flagged"]
    assert single["server"]["mean_ms"]["e2e"] is not None
    # what the stub does not export is absent, never zero
    assert single["server"]["mean_ms"]["inference"] is None
    assert single["server"]["prefix_cache_hit_rate"] is None
    if single["invariants"]["ok"]:
        assert 0 < single["cpu_pct"] < 100 and abs(single["cpu_pct"] + single["gpu_pct"] - 100) < 5
    else:  # a client this loaded machine starved: its figures are withheld, not shown
        assert single["cpu_pct"] is None and single["withheld"]


def test_report_and_metrics_files(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "| single_2k | 1 |" in report and "HTTP OH" in report and "How to read this" in report
    for name in ("single_2k", "conc4_1k", "open"):
        assert (run_dir / "metrics" / f"{name}.before.prom").exists()
        assert (run_dir / "metrics" / f"{name}.after.prom").exists()


def test_api_key_never_written(run_dir):
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"sk-secret-do-not-write" not in path.read_bytes(), path


def test_refuses_to_overwrite_a_run(stub, run_dir):
    with pytest.raises(CputaxError, match="already holds a run"):
        run(RunOptions(endpoint=stub.url, profile=run_dir.parent / "p.toml", out=run_dir))


def test_errors_are_recorded_and_the_run_fails(tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text(
        '[[scenario]]\nname = "x"\nconcurrency = 2\ncontext_tokens = 300\nbatches = 1\nwarmup = 0\n'
    )
    with StubServer(StubConfig(fault="http_500")) as server:
        assert run(RunOptions(endpoint=server.url, profile=profile, out=tmp_path / "o")) == 1
    assert "x: 2 of 2 requests failed: HTTP 500 (2)" in capsys.readouterr().err
    summary = orjson.loads((tmp_path / "o" / "summary.json").read_bytes())
    (scenario,) = summary["scenarios"]
    assert scenario["errors"] == 2 and scenario["requests"] == 2
    assert all(
        r.status == 500 and "HTTP 500" in r.error
        for r in read_requests(tmp_path / "o" / "requests.jsonl")
    )


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cputax.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_unreachable_endpoint_fails_fast_with_one_line(tmp_path):
    proc = cli(
        "run",
        "--endpoint",
        "http://127.0.0.1:9",
        "--profile",
        "smoke",
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "cannot reach http://127.0.0.1:9" in lines[-1]


def test_bad_profile_is_one_line_naming_file_scenario_key(tmp_path):
    profile = tmp_path / "bad.toml"
    profile.write_text(
        '[[scenario]]\nname = "s"\nconcurrency = 1\ncontext_tokens = 100\nwarmpu = 1\n'
    )
    proc = cli("run", "--endpoint", "http://127.0.0.1:9", "--profile", str(profile))
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert str(profile) in line and "'s'" in line and "'warmpu'" in line


def test_the_same_profile_in_two_load_processes(stub, tmp_path):
    profile = tmp_path / "p.toml"
    profile.write_text(PROFILE)
    out = tmp_path / "out"
    code = run(RunOptions(endpoint=stub.url, profile=profile, out=out, client_procs=2))
    assert code == expected_exit(out)
    records = read_requests(out / "requests.jsonl")
    counts = {
        name: sum(r.scenario == name for r in records) for name in ("single_2k", "conc4_1k", "open")
    }
    assert counts == {"single_2k": 2, "conc4_1k": 8, "open": 6}  # as with one process
    windows = [orjson.loads(line) for line in (out / "windows.jsonl").read_bytes().splitlines()]
    assert [w["client_procs"] for w in windows] == [2, 2, 2] and all(
        w["shard_failures"] == [] for w in windows
    )
    assert windows[1]["shard_records"] == [4, 4]
    summary = orjson.loads((out / "summary.json").read_bytes())
    conc = next(s for s in summary["scenarios"] if s["name"] == "conc4_1k")
    # the client's prefill is the stub's own, timed side by side: not another phase's
    assert conc["clock"] == "kernel"
    server_prefill = conc["server"]["mean_ms"]["prefill"]
    assert conc["mean_ms"]["prefill"] == pytest.approx(server_prefill, abs=SIDE_BY_SIDE_MS)


# what a run derives or renders (analysis, report) or keeps verbatim: not raw files
NOT_RAW = {
    "run.json",
    "summary.json",
    "correlation.json",
    "report.md",
    "report.html",
    "plots/",
    "server.log",
}


def test_run_json_names_the_format_of_every_raw_file_written(run_dir):
    info = orjson.loads((run_dir / "run.json").read_bytes())
    assert info["format_version"] == 1
    written = {p.name + "/" if p.is_dir() else p.name for p in run_dir.iterdir()} - NOT_RAW
    assert {"requests.jsonl", "windows.jsonl", "metrics/", "telemetry.jsonl"} <= written
    assert {name: info["formats"].get(name) for name in written} == dict.fromkeys(written, 1)


def _raw_copy(run_dir, dest, **changes):
    """The raw files of `run_dir` in `dest`, run.json changed (a value None: the key removed)."""
    dest.mkdir()
    for name in ("requests.jsonl", "windows.jsonl", "telemetry.jsonl"):
        shutil.copy(run_dir / name, dest / name)
    shutil.copytree(run_dir / "metrics", dest / "metrics")
    info = orjson.loads((run_dir / "run.json").read_bytes())
    info.update(changes)
    write_json(dest / "run.json", {k: v for k, v in info.items() if v is not None})
    return dest


def test_report_refuses_a_run_json_of_an_unknown_version_in_one_line(run_dir, tmp_path):
    bad = _raw_copy(run_dir, tmp_path / "v99", format_version=99)
    proc = cli("report", str(bad))
    assert proc.returncode != 0
    (line,) = proc.stderr.strip().splitlines()
    assert "run.json format version 99" in line and "reads version 1" in line
    assert not (bad / "summary.json").exists()  # refused before analysing anything


def test_a_raw_file_of_an_unknown_version_is_refused(run_dir, tmp_path):
    bad = _raw_copy(run_dir, tmp_path / "requests-v2", formats={**RAW_FORMATS, "requests.jsonl": 2})
    with pytest.raises(CputaxError, match=r"requests.jsonl format version 2") as caught:
        RunDir.existing(bad)
    assert "\n" not in str(caught.value)


def test_a_run_json_without_versions_is_version_1(run_dir, tmp_path):
    old = _raw_copy(run_dir, tmp_path / "unversioned", format_version=None, formats=None)
    assert "format_version" not in orjson.loads((old / "run.json").read_bytes())
    proc = cli("report", str(old))
    assert proc.returncode == 0, proc.stderr
    summary = orjson.loads((old / "summary.json").read_bytes())
    assert [s["name"] for s in summary["scenarios"]] == ["single_2k", "conc4_1k", "open"]
