"""Small helpers every layer may use: statistics, child processes, loopback ports.

Nothing here knows about servers, runs or reports.
"""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import sys

__all__ = ["client_host", "cpu_model", "die_with_parent", "free_port", "percentile", "port_is_free", "redact", "url_host"]

_SECRET = re.compile(r"key|token|secret|passw|auth", re.I)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), recorded beside every figure; "" when unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of a non-empty list."""
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# Loaded here, not in the forked child, where taking the loader's lock could deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child before exec: `sig` when the parent dies (Linux prctl PR_SET_PDEATHSIG).

    Covers a parent killed with SIGKILL, where __exit__ never runs. The "parent" is the
    thread that started the child, so start it from a thread that outlives it.
    """
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, sig)


def client_host(host: str) -> str:
    """Where a client on this machine connects for a server bound to `host`."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _bind_probe(host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, port))
        return s.getsockname()[1]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's choice)."""
    return _bind_probe(host, 0)


def port_is_free(host: str, port: int) -> bool:
    try:
        _bind_probe(host, port)
    except OSError:
        return False
    return True


def redact(argv: list[str], keep: int = 12) -> list[str]:
    """A command line safe to store: the values of flags that look like credentials, and any
    other argument that mentions one (a JSON config with an api_key), are hidden."""
    out: list[str] = []
    hide = False
    for arg in argv[:keep]:
        if arg.startswith("-") and _SECRET.search(arg):
            flag, eq, _ = arg.partition("=")
            out.append(f"{flag}=***" if eq else arg)
            hide = not eq
        elif hide or _SECRET.search(arg):
            out.append("***")
            hide = False
        else:
            out.append(arg[:120])
    return out
