"""py-spy formats, the sampler's lifecycle and its failure modes, process discovery."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import orjson
import pytest

from cputax.rundir import RunDir
from cputax.sampling import pyspy
from cputax.sampling.classify import Frame, parse_frame
from cputax.sampling.flamegraph import render_svg
from cputax.sampling.pyspy import PyspyProcess, SamplerConfig, ptrace_problem, read_log
from cputax.sampling.pyspy_monitor import Discovery, PyspyMonitor
from cputax.sampling.stacks import (
    ThreadId,
    clip,
    collapse,
    read_chrometrace,
    read_raw,
    write_collapsed,
    write_speedscope,
)
from cputax.targets.processes import find_server
from cputax.workload.profiles import CONTROL_SUFFIX, Scenario, is_control, with_controls

HAVE_PYSPY = shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()
needs_pyspy = pytest.mark.skipif(not HAVE_PYSPY, reason=f"needs py-spy: {pyspy.INSTALL_HINT}")
can_ptrace = pytest.mark.skipif(
    ptrace_problem([os.getpid()]) is not None, reason="no ptrace permission here"
)


def ev(ph, name, file, ts, tid=1, pid=9):
    return {
        "args": {"filename": file, "line": 3},
        "cat": "py-spy",
        "name": name,
        "ph": ph,
        "pid": pid,
        "tid": tid,
        "ts": ts,
    }


# --- formats -------------------------------------------------------------------------------------
def test_chrometrace_to_spans(tmp_path):
    root = "thread (42): Thread-3 (_run_generation_loop)"
    events = [
        ev("B", root, "", 10),
        ev("B", "loop", "/x/site-packages/pkg/a.py", 10),
        ev("B", "f", "/x/site-packages/pkg/b.py", 10),
        ev("E", "f", "", 30),
        ev("B", "g", "/x/site-packages/pkg/b.py", 30),
        {"name": "thread_name", "ph": "M", "pid": 9, "tid": 1, "ts": 0, "args": {"name": "meta"}},
        ev("B", "other", "/usr/lib/python3.12/threading.py", 35, tid=2),
        ev("E", "g", "", 70),
        ev("E", "loop", "", 70),
        ev("E", root, "", 70),
        ev("E", "other", "", 70, tid=2),
    ]
    path = tmp_path / "t.json"
    path.write_bytes(orjson.dumps(events))
    timeline = read_chrometrace(path)
    gen = ThreadId(9, 42, "Thread-3 (_run_generation_loop)")
    loop, f, g = Frame("loop", "pkg/a.py"), Frame("f", "pkg/b.py"), Frame("g", "pkg/b.py")
    assert timeline[gen] == [(10, 30, (loop, f)), (30, 70, (loop, g))]
    assert timeline[ThreadId(9, 2, "")] == [
        (35, 70, (Frame("other", "threading.py"),))
    ]  # no --threads root
    assert gen.label == "Thread-3 (_run_generation_loop)" and ThreadId(9, 2, "").label == "thread 2"
    assert clip(timeline[gen], 20, 40) == [(20, 30, (loop, f)), (30, 40, (loop, g))]
    assert collapse(timeline[gen], rate=100_000) == pytest.approx(
        Counter({(loop, f): 2.0, (loop, g): 4.0})
    )


def test_raw_roundtrip_and_roots(tmp_path):
    raw = tmp_path / "raw.txt"
    raw.write_text(
        'process 77:"python srv.py";thread (5): Thread-1 (worker);'
        "run (srv.py:3);work (srv.py:9) 4\n"
        "thread (6): MainThread;<module> (srv.py:1) 2\n\n"
    )
    stacks = read_raw(raw)
    worker = ThreadId(77, 5, "Thread-1 (worker)")
    assert stacks[worker] == Counter({(Frame("run", "srv.py"), Frame("work", "srv.py")): 4})
    assert stacks[ThreadId(None, 6, "MainThread")] == Counter({(Frame("<module>", "srv.py"),): 2})
    out = tmp_path / "out.txt"
    write_collapsed(out, {worker: stacks[worker]})
    assert out.read_text() == "thread (5): Thread-1 (worker);run (srv.py);work (srv.py) 4\n"
    assert read_raw(out)[ThreadId(None, 5, "Thread-1 (worker)")] == stacks[worker]
    assert parse_frame("wait (threading.py:320)") == Frame("wait", "threading.py")
    assert parse_frame("odd frame") == Frame("odd frame", "")


def test_speedscope_events_nest(tmp_path):
    a, b, c = Frame("a", "m.py"), Frame("b", "m.py"), Frame("c", "m.py")
    timeline = {ThreadId(1, 1, "T"): [(0, 10, (a, b)), (10, 20, (a, c)), (30, 40, (a,))]}
    path = tmp_path / "s.json"
    write_speedscope(path, timeline, "x")
    data = orjson.loads(path.read_bytes())
    names = [f["name"] for f in data["shared"]["frames"]]
    events = [(e["type"], names[e["frame"]], e["at"]) for e in data["profiles"][0]["events"]]
    assert events == [
        ("O", "a", 0),
        ("O", "b", 0),
        ("C", "b", 10),
        ("O", "c", 10),
        ("C", "c", 20),
        ("C", "a", 20),
        ("O", "a", 30),
        ("C", "a", 40),
    ]
    assert data["profiles"][0]["type"] == "evented"


def test_flamegraph_svg_is_valid():
    svg = render_svg(
        {("thread (1): T", "a (m.py)", "b <&> (m.py)"): 30.0, ("thread (1): T", "a (m.py)"): 10.0},
        "title",
        {"a (m.py)": "tokenize"}.get,
    )
    root = ET.fromstring(svg)
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "a (m.py) — 40 samples (100.0%)" in titles
    assert any(t.startswith("b <&> (m.py) — 30 samples (75.0%)") for t in titles)


# --- py-spy's messages ---------------------------------------------------------------------------
def test_read_log():
    ok = read_log(
        "py-spy> Stopped sampling because Control-C pressed\n"
        "py-spy> Wrote chrome trace to 'x'. Samples: 450 Errors: 1\n",
        0,
    )
    assert (ok.status, ok.samples, ok.errors) == ("ok", 450, 1)
    exited = read_log(
        "py-spy> Stopped sampling because process exited\n"
        "py-spy> Wrote chrome trace to 'x'. Samples: 227 Errors: 0",
        0,
    )
    assert exited.status == "exited" and "partial data is kept" in exited.message
    denied = read_log(
        "Permission Denied: Try running again with elevated permissions by going "
        "'sudo env \"PATH=$PATH\" !!'",
        1,
    )
    assert (
        denied.status == "permission"
        and "CAP_SYS_PTRACE" in denied.message
        and "ptrace_scope" in denied.message
    )
    assert (
        read_log("Error: Failed to find python version from target process", 1).status
        == "not_python"
    )
    behind = read_log(
        "py-spy> 1.52s behind in sampling, results may be inaccurate. "
        "Try reducing the sampling rate\n"
        "py-spy> 250.3ms behind in sampling, results may be inaccurate.\nSamples: 9 Errors: 0",
        0,
    )
    assert behind.behind_warnings == 2 and behind.behind_s == pytest.approx(1.52)
    assert read_log("Error: something else broke", 1).message == "Error: something else broke"


def test_native_turns_blocking_and_rate_must_be_positive():
    assert SamplerConfig(native=True).nonblocking is False
    with pytest.raises(Exception, match="rate"):
        SamplerConfig(rate=0)


def test_ptrace_problem_names_the_fix(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(pyspy, "_has_cap", lambda bit: False)
    monkeypatch.setattr(pyspy, "_read", lambda path: "1" if "ptrace_scope" in path else None)
    message = ptrace_problem([os.getpid()])
    assert (
        "root" in message
        and "CAP_SYS_PTRACE" in message
        and "kernel.yama.ptrace_scope=0` (now 1)" in message
    )
    monkeypatch.setattr(pyspy, "_has_cap", lambda bit: True)
    assert ptrace_problem([os.getpid()]) is None


def test_monitor_without_permission_continues_without_profiles(tmp_path, monkeypatch):
    from cputax.sampling import pyspy_monitor as monitor_module

    monkeypatch.setattr(
        monitor_module,
        "ptrace_problem",
        lambda pids: "no permission to ptrace process 1: run as root",
    )
    monkeypatch.setattr(monitor_module, "find_pyspy", lambda: "/bin/true")
    m = PyspyMonitor(SamplerConfig(), Discovery(pid=os.getpid()))
    m.start(RunDir(tmp_path), {"kind": "external"})
    m.scenario_start("s", 0)
    m.scenario_end("s", 1)
    meta = m.stop()
    assert meta["problem"].startswith("no permission") and not (tmp_path / "pyspy").exists()


def test_controls_alternate():
    scenarios = [Scenario("a", 1, 100), Scenario("b", 1, 100)]
    names = [s.name for s in with_controls(scenarios)]
    assert names == ["a", "a" + CONTROL_SUFFIX, "b" + CONTROL_SUFFIX, "b"]
    assert is_control("b" + CONTROL_SUFFIX) and not is_control("b")


# --- process discovery ---------------------------------------------------------------------------
FAKE_VLLM = textwrap.dedent("""\
    import socket, subprocess, sys, time
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    child = subprocess.Popen(["bash", "-c", 'exec -a VLLM::EngineCore_DP0 "$0" -c \
"import time; time.sleep(60)"', sys.executable])
    print(s.getsockname()[1], child.pid, flush=True)
    time.sleep(60)
""")


@pytest.fixture
def fake_vllm():
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_VLLM, "vllm", "serve", "fake-model"],
        stdout=subprocess.PIPE,
        text=True,
    )
    port, child = map(int, proc.stdout.readline().split())
    time.sleep(0.3)  # let the child exec
    yield proc.pid, port, child
    for pid in (child, proc.pid):
        os.kill(pid, 15)
    proc.wait()


def test_find_server_by_pid_port_and_title(fake_vllm):
    pid, port, child = fake_vllm
    want = {(pid, "api_server"), (child, "engine_core")}
    server, procs = find_server("auto", pid=pid)
    assert server == "vllm" and {(p.pid, p.role) for p in procs} == want
    server, procs = find_server("auto", port=port)
    assert server == "vllm" and {(p.pid, p.role) for p in procs} == want
    server, procs = find_server("vllm")
    assert want <= {(p.pid, p.role) for p in procs}


def test_find_server_errors():
    with pytest.raises(Exception, match="--pid 999999999: no such process"):
        find_server("auto", pid=999_999_999)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(Exception, match=f"--port {free}: no process"):
        find_server("auto", port=free)


# --- py-spy for real -----------------------------------------------------------------------------
TARGET = textwrap.dedent("""\
    import hashlib, sys, threading, time
    def busy():
        end = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < end:
            hashlib.sha256(b"x" * 20000).digest()
    def sleeper():
        time.sleep(60)
    threading.Thread(target=sleeper, name="sleepy", daemon=True).start()
    threading.Thread(target=busy, name="busy-thread").start()
    print("ready", flush=True)
""")


def _target(tmp_path: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET, str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


@needs_pyspy
@can_ptrace
@pytest.mark.slow
def test_process_exiting_mid_sampling_keeps_its_data(tmp_path):
    proc = _target(tmp_path, 1.0)
    sampler = PyspyProcess(
        pyspy.find_pyspy(),
        proc.pid,
        tmp_path / "t.json",
        tmp_path / "t.log",
        SamplerConfig(rate=100),
    )
    sampler.start()
    proc.wait()
    time.sleep(0.5)
    log = sampler.stop()
    assert log.status == "exited" and log.samples > 0
    threads = {t.name: spans for t, spans in read_chrometrace(tmp_path / "t.json").items()}
    assert any(stack and stack[-1].func == "busy" for _, _, stack in threads["busy-thread"])


@needs_pyspy
@can_ptrace
@pytest.mark.slow
def test_timeline_is_on_the_run_clock(tmp_path):
    """A target switches from a() to b() at a monotonic time it prints; the first sample that
    sees b(), placed on the run's clock, must land just after it."""
    code = textwrap.dedent("""\
        import time
        switch = time.monotonic_ns() + 700_000_000
        print(switch, flush=True)
        def a():
            while time.monotonic_ns() < switch: pass
        def b():
            end = switch + 800_000_000
            while time.monotonic_ns() < end: pass
        a(); b()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    switch = int(proc.stdout.readline())
    sampler = PyspyProcess(
        pyspy.find_pyspy(),
        proc.pid,
        tmp_path / "t.json",
        tmp_path / "t.log",
        SamplerConfig(rate=500),
    )
    sampler.start()
    proc.wait()
    sampler.stop()
    spans = [s for v in read_chrometrace(tmp_path / "t.json").values() for s in v]
    first_b = min(t0 for t0, _, stack in spans if stack and stack[-1].func == "b")
    error_ms = (sampler.t_launched_ns + first_b * 1000 - switch) / 1e6
    assert -50 < error_ms < 50, error_ms


@needs_pyspy
@pytest.mark.slow
def test_non_python_process_is_reported(tmp_path):
    proc = subprocess.Popen(["sleep", "30"])
    try:
        sampler = PyspyProcess(
            pyspy.find_pyspy(), proc.pid, tmp_path / "t.json", tmp_path / "t.log", SamplerConfig()
        )
        sampler.start()
        time.sleep(1.0)
        assert sampler.stop().status in ("not_python", "permission")
    finally:
        proc.kill()
        proc.wait()


@needs_pyspy
@can_ptrace
@pytest.mark.slow
def test_profile_command(tmp_path):
    proc = _target(tmp_path, 4.0)
    try:
        out = tmp_path / "prof"
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "cputax.cli",
                "profile",
                "--pid",
                str(proc.pid),
                "--duration",
                "1.5",
                "--out",
                str(out),
                "--rate",
                "100",
                "--gil",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.wait()
    assert run.returncode == 0, run.stderr
    result = orjson.loads((out / "pyspy" / "attribution.json").read_bytes())
    threads = {r["thread"]: r for r in result["windows"][0]["threads"]}
    assert threads["busy-thread"]["active"] > 0.5 and threads["busy-thread"]["gil"] > 0
    assert (
        threads["busy-thread"]["categories"].get("other", 0) > 0.5
    )  # no server's code: nothing matches
    assert "| process" in run.stdout and "busy-thread" in run.stdout


@needs_pyspy
@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to drop it"
)
def test_profile_without_permission_says_how_to_fix(tmp_path):
    proc = _target(tmp_path, 10.0)
    home = Path(
        tempfile.mkdtemp(prefix="cputax-nobody-")
    )  # pytest's tmp_path is not reachable by nobody
    home.chmod(0o777)
    try:
        run = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                sys.executable,
                "-m",
                "cputax.cli",
                "profile",
                "--pid",
                str(proc.pid),
                "--duration",
                "1",
                "--out",
                str(home / "prof"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "HOME": str(home)},
        )
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "CAP_SYS_PTRACE" in lines[0] and "root" in lines[0]
