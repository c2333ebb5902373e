"""The slowdown plugin: makes named server functions slower by a known factor, for what-if
experiments (`cputax whatif`).

vLLM loads it in every process (entry point `cputax_slowdown` in `vllm.general_plugins`).
It does nothing unless the environment variable CPUTAX_SLOWDOWN names a control file,
which cputax writes (cputax.targets.slowdown):

    {"functions": [{"component": "schedule", "target": "module:Class.method",
                    "process": "engine_core", "gil": "held"}, ...],
     "roles": [["engine_core", "^VLLM::EngineCore"], ...],   # process role by cmdline regex
     "stats_dir": "...", "period_s": 0.05,
     "epoch": 3, "slowdowns": {"schedule": 0.5}}              # rewritten for each point

Each wrapped call measures its own duration d (wall time, less any time slowdowns nested in
it added) and then adds k * d of CPU work, not a sleep: a spin that holds the GIL where
the function holds it, or hashing in C with the GIL released where the function releases
it (a Rust tokenizer). A call inside another call that is being slowed adds nothing: the
outer one already counts its time. A thread re-reads the control file when it changes and
writes this process's totals to `stats_dir/<pid>.json` every period_s: calls, own time,
time added and time asked for (k * d), per component, and the epoch it has applied.

Imports nothing of cputax: vLLM's processes load it without the measuring side.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ENV", "burn_held", "burn_released", "placebo_tick", "register", "slowed"]

ENV = "CPUTAX_SLOWDOWN"
PLACEBO_PERIOD_S = 0.02  # the placebo thread's tick
_CHUNK = b"\x5a" * 16384  # hashlib releases the GIL for data of 2 KiB or more; ~10-40 us a chunk
_BIG = b"\x5a" * (8 << 20)  # one released call of up to a few ms
_VIEW = memoryview(_BIG)
_rate = [2.0]  # ns per byte hashed, as measured (a first guess until the first burn)

_slowdowns: dict[str, float] = {}
_stats: dict[str, list[int]] = {}  # component -> [calls, own_ns, added_ns, target_ns]
_lock = threading.Lock()
_local = threading.local()
_state: dict[str, Any] = {"registered": False}


def burn_held(ns: int) -> int:
    """Spin for `ns` holding the GIL, as Python code does (it still yields at the switch
    interval, as the function would); the time it took."""
    start = time.perf_counter_ns()
    end = start + ns
    while time.perf_counter_ns() < end:
        pass
    return time.perf_counter_ns() - start


def burn_released(ns: int) -> int:
    """Hash in C with the GIL released for `ns`, as a Rust tokenizer works; the time it took.

    Most of the time goes in one call (sized by the hashing rate measured so far) so the
    GIL is released and taken back about once, as the tokenizer does; at most two more
    sized calls and a few small chunks finish it. Chunk by chunk throughout, every chunk
    would ask for the GIL back and force the thread holding it to let go each switch
    interval: a cost the tokenizer does not have.
    """
    start = time.perf_counter_ns()
    end = start + ns
    for _ in range(3):  # the GIL taken back after each call can take a switch interval
        now = time.perf_counter_ns()
        size = min(int(0.9 * (end - now) / _rate[0]), len(_BIG))
        if size < 4 * len(_CHUNK):
            break
        hashlib.sha256(_VIEW[:size]).digest()
        took = time.perf_counter_ns() - now
        _rate[0] = 0.8 * _rate[0] + 0.2 * max(took / size, 0.01)
    while time.perf_counter_ns() < end:
        hashlib.sha256(_CHUNK).digest()
    return time.perf_counter_ns() - start


BURNS = {"held": burn_held, "released": burn_released}


def slowed(fn: Callable[..., Any], component: str, gil: str) -> Callable[..., Any]:
    """`fn` timed, with k * d of work added after each call (k: the component's slowdown)."""
    burn = BURNS[gil]
    totals = _stats.setdefault(component, [0, 0, 0, 0])

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        local = _local
        outer = getattr(local, "slowing", False)
        k = _slowdowns.get(component, 0.0)
        added_before = getattr(local, "added", 0)
        local.slowing = outer or k > 0
        t0 = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            own = time.perf_counter_ns() - t0 - (getattr(local, "added", 0) - added_before)
            local.slowing = outer
            target = added = 0
            if k > 0 and not outer:
                target = int(k * own)
                added = burn(target)
                local.added = getattr(local, "added", 0) + added
            with _lock:
                totals[0] += 1
                totals[1] += own
                totals[2] += added
                totals[3] += target

    wrapper.__cputax_slowed__ = component  # type: ignore[attr-defined]
    return wrapper


def placebo_tick() -> None:
    """A fixed bit of work on a thread no request waits for: the placebo component (one
    hash of 128 KiB, the GIL released once, as a tokenizer call)."""
    hashlib.sha256(_VIEW[: 128 << 10]).digest()


def _placebo_loop() -> None:
    while True:
        placebo = globals()["placebo_tick"]  # the wrapped one, once wrapped
        placebo()
        time.sleep(PLACEBO_PERIOD_S)


def _resolve(target: str) -> tuple[Any, str, Any]:
    """(owner, attribute, function) of "module:Qual.name"."""
    module_name, _, qual = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, attr = qual.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, attr, inspect.getattr_static(owner, attr)


def _role(roles: list[list[str]]) -> str:
    """This process's role: its (retitled) cmdline against the server table's patterns."""
    try:
        cmdline = (
            Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        cmdline = ""
    for role, pattern in roles:
        if re.search(pattern, cmdline):
            return role
    return "api_server" if multiprocessing.parent_process() is None else "other"


def _wrap_all(control: dict[str, Any], role: str) -> tuple[list[str], list[str]]:
    wrapped, missing = [], []
    for spec in control["functions"]:
        if spec["process"] not in (role, "*"):
            continue
        try:
            owner, attr, fn = _resolve(spec["target"])
        except (ImportError, AttributeError) as exc:
            missing.append(f"{spec['target']}: {exc}")
            continue
        kind = (
            staticmethod
            if isinstance(fn, staticmethod)
            else classmethod
            if isinstance(fn, classmethod)
            else None
        )
        inner = fn.__func__ if kind else fn
        if inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner):
            missing.append(f"{spec['target']}: a coroutine, its time is not its own")
            continue
        if getattr(inner, "__cputax_slowed__", None):
            continue
        new = slowed(inner, spec["component"], spec["gil"])
        setattr(owner, attr, kind(new) if kind else new)
        wrapped.append(spec["target"])
    return wrapped, missing


def _write_stats(path: Path, info: dict[str, Any]) -> None:
    with _lock:
        components = {
            c: dict(zip(("calls", "own_ns", "added_ns", "target_ns"), v, strict=True))
            for c, v in _stats.items()
        }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                **info,
                "epoch": _state["epoch"],
                "written_ns": time.monotonic_ns(),
                "components": components,
            }
        )
    )
    os.replace(tmp, path)


def _apply(control: dict[str, Any]) -> None:
    _slowdowns.clear()
    _slowdowns.update({c: float(k) for c, k in control.get("slowdowns", {}).items()})
    _state["epoch"] = control.get("epoch", 0)


def _watch(control_path: Path, stats_path: Path, info: dict[str, Any], period_s: float) -> None:
    seen = control_path.stat().st_mtime_ns
    while True:
        with contextlib.suppress(OSError, ValueError):
            mtime = control_path.stat().st_mtime_ns
            if mtime != seen:
                _apply(json.loads(control_path.read_text()))
                seen = mtime
            _write_stats(stats_path, info)
        time.sleep(period_s)


def register() -> None:
    """vLLM's entry point: wrap this process's functions, if cputax asked (CPUTAX_SLOWDOWN)."""
    path = os.environ.get(ENV)
    if not path or _state["registered"]:
        return
    _state["registered"] = True
    control_path = Path(path)
    control = json.loads(control_path.read_text())
    _apply(control)
    role = _role(control.get("roles", []))
    wrapped, missing = _wrap_all(control, role)
    stats_dir = Path(control["stats_dir"])
    stats_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": os.getpid(), "role": role, "wrapped": wrapped, "missing": missing}
    stats_path = stats_dir / f"{os.getpid()}.json"
    _write_stats(stats_path, info)
    threading.Thread(
        target=_watch,
        name="cputax-slowdown",
        daemon=True,
        args=(control_path, stats_path, info, float(control.get("period_s", 0.05))),
    ).start()
    if any(t.endswith(":placebo_tick") for t in wrapped):
        threading.Thread(target=_placebo_loop, name="cputax-placebo", daemon=True).start()
