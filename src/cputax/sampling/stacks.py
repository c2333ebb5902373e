"""py-spy's formats in and out: chrometrace and raw (collapsed) stacks read into per-thread
data; collapsed stacks and speedscope files written from a timeline.

A timeline is, per thread, the list of (t0_us, t1_us, stack) during which py-spy saw that
stack: chrometrace records an event only when a thread's stack changes, so an interval
runs from the sample that first saw a stack to the sample that saw the next one. Time in
an interval estimates the share of samples, and samples = seconds x rate (the intervals
between py-spy's samples are random, exponential with mean 1/rate).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson

from cputax.errors import CputaxError
from cputax.sampling.classify import Frame, Stack, parse_frame, short_path

_THREAD = re.compile(r"^thread \((?P<tid>0x[0-9a-fA-F]+|\d+)\)(?::\s?(?P<name>.*))?$")
_PROCESS = re.compile(r'^process (?P<pid>\d+):"?(?P<cmd>.*?)"?$')


@dataclass(frozen=True, order=True)
class ThreadId:
    pid: int | None
    tid: int | None  # the OS thread id py-spy prints with --threads
    name: str

    @property
    def label(self) -> str:
        return self.name or f"thread {self.tid}"


Span = tuple[int, int, Stack]  # t0_us, t1_us, stack without the thread's root frame
Timeline = dict[ThreadId, list[Span]]


def _thread_of(root: Frame, pid: int | None, fallback_tid: int | None) -> ThreadId | None:
    """The thread a --threads root frame names, or None when it is an ordinary frame."""
    m = _THREAD.match(root.func) if not root.path else None
    if m is None:
        return None
    return ThreadId(pid, int(m["tid"], 0), m["name"] or "")


def read_chrometrace(path: Path) -> Timeline:
    """Per thread, the spans of constant stack, in microseconds since py-spy started."""
    try:
        events = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise CputaxError(f"{path}: not a py-spy chrometrace file ({exc})") from exc
    if not isinstance(events, list):
        events = events.get("traceEvents", []) if isinstance(events, dict) else []
    frames: dict[tuple[str, str], Frame] = {}
    stacks: dict[tuple[int, int], list[Frame]] = {}
    since: dict[tuple[int, int], int] = {}
    out: Timeline = {}

    def emit(key: tuple[int, int], t1: int) -> None:
        stack = stacks.get(key)
        if not stack or t1 <= since[key]:
            return
        thread = _thread_of(stack[0], key[0], key[1])
        rest = tuple(stack[1:]) if thread else tuple(stack)
        thread = thread or ThreadId(key[0], key[1], "")
        out.setdefault(thread, []).append((since[key], t1, rest))

    for ev in events:
        phase = ev.get("ph")
        if phase not in ("B", "E"):
            continue
        key = (ev.get("pid"), ev.get("tid"))
        ts = int(ev.get("ts", 0))
        if key in since and ts > since[key]:
            emit(key, ts)
        since[key] = ts
        stack = stacks.setdefault(key, [])
        if phase == "B":
            name, file = ev.get("name", "?"), (ev.get("args") or {}).get("filename", "")
            frame = frames.get((name, file))
            if frame is None:
                frame = frames[(name, file)] = Frame(name, short_path(file))
            stack.append(frame)
        elif stack:
            stack.pop()
    return out


def read_raw(path: Path) -> dict[ThreadId, Counter[Stack]]:
    """py-spy raw (collapsed) lines `frame;frame;... COUNT`, split by thread when --threads
    (and by process when --subprocesses) put root frames there."""
    out: dict[ThreadId, Counter[Stack]] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        raise CputaxError(f"{path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        text, _, count = line.rstrip().rpartition(" ")
        if not text:
            continue
        try:
            weight = float(count)
        except ValueError as exc:
            raise CputaxError(
                f"{path}:{number}: not a collapsed-stack line (`frame;frame COUNT`)"
            ) from exc
        parts = text.split(";")
        pid = None
        if m := _PROCESS.match(parts[0]):
            pid, parts = int(m["pid"]), parts[1:]
        thread = _thread_of(Frame(parts[0], ""), pid, None) if parts else None
        if thread:
            parts = parts[1:]
        thread = thread or ThreadId(pid, None, "")
        out.setdefault(thread, Counter())[tuple(parse_frame(p) for p in parts)] += weight
    return out


def clip(spans: Iterable[Span], t0: float, t1: float) -> list[Span]:
    """The parts of spans inside [t0, t1)."""
    return [(max(a, t0), min(b, t1), s) for a, b, s in spans if b > t0 and a < t1]


def collapse(spans: Iterable[Span], rate: float) -> Counter[Stack]:
    """Estimated samples per stack: seconds in each stack x rate."""
    weights: Counter[Stack] = Counter()
    for a, b, stack in spans:
        weights[stack] += (b - a) * 1e-6 * rate
    return weights


def thread_root(thread: ThreadId) -> str:
    return f"thread ({thread.tid}): {thread.name}" if thread.name else f"thread ({thread.tid})"


def write_collapsed(path: Path, stacks: Mapping[ThreadId, Counter[Stack]]) -> None:
    """py-spy's raw format (thread root frame first), counts rounded to whole samples."""
    lines = []
    for thread in sorted(stacks):
        for stack, weight in sorted(stacks[thread].items(), key=lambda kv: -kv[1]):
            if round(weight) >= 1:
                lines.append(
                    ";".join([thread_root(thread), *(f.text() for f in stack)])
                    + f" {round(weight)}"
                )
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def _close(
    open_: list[Frame], depth: int, at: int, index: dict[Frame, int], events: list[dict]
) -> None:
    while len(open_) > depth:
        events.append({"type": "C", "frame": index[open_.pop()], "at": at})


def write_speedscope(path: Path, timeline: Timeline, name: str) -> None:
    """An evented speedscope profile per thread: the timeline itself, in time order."""
    index: dict[Frame, int] = {}
    profiles = []
    for thread in sorted(timeline):
        spans = sorted(timeline[thread])
        if not spans:
            continue
        events: list[dict] = []
        open_: list[Frame] = []
        last = spans[0][0]
        for t0, t1, stack in spans:
            if t0 > last:
                _close(open_, 0, last, index, events)  # a gap: the thread was not seen
            common = 0
            while common < min(len(open_), len(stack)) and open_[common] == stack[common]:
                common += 1
            _close(open_, common, t0, index, events)
            for frame in stack[common:]:
                events.append({"type": "O", "frame": index.setdefault(frame, len(index)), "at": t0})
                open_.append(frame)
            last = t1
        _close(open_, 0, last, index, events)
        profiles.append(
            {
                "type": "evented",
                "name": f"{thread.label} (tid {thread.tid})",
                "unit": "microseconds",
                "startValue": spans[0][0],
                "endValue": last,
                "events": events,
            }
        )
    frames = [{"name": f.func, "file": f.path} for f in index]
    path.write_bytes(
        orjson.dumps(
            {
                "$schema": "https://www.speedscope.app/file-format-schema.json",
                "shared": {"frames": frames},
                "profiles": profiles,
                "name": name,
                "exporter": "cputax",
            }
        )
    )
