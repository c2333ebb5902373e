"""Small helpers every layer may use: statistics, child processes, loopback ports, pacing.

Nothing here knows about servers, runs or reports.
"""

from __future__ import annotations

import asyncio
import ctypes
import re
import signal
import socket
import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = [
    "average",
    "client_host",
    "cpu_model",
    "die_with_parent",
    "free_port",
    "percentile",
    "port_is_free",
    "redact",
    "sleep_until",
    "url_host",
]

_SECRET = re.compile(r"key|token|secret|passw|auth", re.I)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), recorded beside every figure; "" when unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next(
                (line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), ""
            )
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


def average(values: Iterable[float | None] | Any) -> float | None:
    """The mean of the values that are there: None and NaN are absent, never zero, so
    they are left out; None when nothing is left. A numpy array stays vectorised (a
    column of a million requests)."""
    if hasattr(values, "dtype"):
        kept = values[values == values]  # NaN != NaN
        return float(kept.mean()) if len(kept) else None
    nums = [v for v in values if v is not None and v == v]
    return sum(nums) / len(nums) if nums else None


async def sleep_until(deadline_ns: int) -> None:
    """Sleep until `deadline_ns` on time.monotonic_ns(); return at once if it has passed.
    Pacing by deadline, not by interval, keeps a late wake-up from delaying the next."""
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


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
