"""Classify a sampled Python stack into one category of where a server's CPU time goes.

A rule table is ordered. For a stack, frames are tried from the innermost (the leaf)
outwards and, for each frame, the rules in order: the first rule that matches names the
category. So the most specific code wins: tokenization called from a route handler is
`tokenize`, not `http`, and a library used everywhere (pydantic, asyncio, torch) needs no
rule of its own, its caller decides. A stack no rule matches is `other`; its innermost
frame is counted so that the table can be extended.

Paths are matched as py-spy prints them without --full-filenames: relative to
site-packages or to the standard library (`vllm/v1/core/sched/scheduler.py`,
`threading.py`). An absolute path that could not be shortened (an editable checkout)
matches a rule whose path is its tail.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

CATEGORIES = (
    "http", "chat_template", "tokenize", "preprocess", "ipc", "schedule", "kv_cache",
    "prefix_hash", "model_execute", "gpu_wait", "sample", "output_process", "detokenize",
    "sse", "metrics", "kv_connector", "gc", "idle", "other",
)
IDLE = "idle"
OTHER = "other"

_SITE = re.compile(r".*/(?:site|dist)-packages/")
_STDLIB = re.compile(r".*/lib/python\d+(?:\.\d+)?t?/")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<path>[^()]*?)(?::(?P<line>\d+))?\)$")


class Frame(NamedTuple):
    func: str  # as py-spy names it: "Class.method", "outer.<locals>.inner", "<module>"
    path: str  # shortened by short_path

    def text(self) -> str:
        return f"{self.func} ({self.path})"


Stack = tuple[Frame, ...]  # outermost frame first, as in py-spy's raw (collapsed) lines


def short_path(path: str) -> str:
    """A file name as py-spy shows it without --full-filenames: the package-relative part."""
    for prefix in (_SITE, _STDLIB):
        if m := prefix.match(path):
            return path[m.end():]
    return path


def parse_frame(text: str) -> Frame:
    """One frame of a py-spy raw line: `func (path:line)`, `func (path)` with --nolineno."""
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "")
    return Frame(m["func"], short_path(m["path"]))


@dataclass(frozen=True)
class Rule:
    """Frames of `path` (glob) and `func` (glob on py-spy's function name) are `category`.

    `leaf`: only when the frame is the innermost one (a wait: the thread is blocked
    there, not in something it called). `within`: only below a frame matching
    (path, func): the same wait means something else inside that caller.
    """

    category: str
    path: str = "*"
    func: str = "*"
    leaf: bool = False
    within: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r} in {self}")


class _Pattern:
    def __init__(self, path: str, func: str) -> None:
        self._path = re.compile(fnmatch.translate(path))
        self._tail = re.compile(r".*/" + fnmatch.translate(path))
        self._func = re.compile(fnmatch.translate(func))

    def matches(self, frame: Frame) -> bool:
        if not self._func.match(frame.func):
            return False
        if self._path.match(frame.path):
            return True
        return frame.path.startswith("/") and bool(self._tail.match(frame.path))


class Classifier:
    """A rule table, compiled, with per-frame and per-stack caches (stacks repeat a lot)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)
        self._patterns = [_Pattern(r.path, r.func) for r in self.rules]
        self._within = [_Pattern(*r.within) if r.within else None for r in self.rules]
        self._frame_rules: dict[Frame, tuple[int, ...]] = {}
        self._stacks: dict[Stack, str] = {}

    def _candidates(self, frame: Frame) -> tuple[int, ...]:
        found = self._frame_rules.get(frame)
        if found is None:
            found = tuple(i for i, p in enumerate(self._patterns) if p.matches(frame))
            self._frame_rules[frame] = found
        return found

    def category(self, stack: Stack) -> str:
        """The category of one sample's stack (outermost frame first)."""
        cached = self._stacks.get(stack)
        if cached is not None:
            return cached
        result = OTHER
        last = len(stack) - 1
        for i in range(last, -1, -1):
            for r in self._candidates(stack[i]):
                rule = self.rules[r]
                if rule.leaf and i != last:
                    continue
                within = self._within[r]
                if within is not None and not any(within.matches(f) for f in stack[:i]):
                    continue
                result = rule.category
                break
            else:
                continue
            break
        self._stacks[stack] = result
        return result

    def frame_category(self, frame: Frame) -> str | None:
        """The category of the first rule naming this frame, ignoring leaf/within (for colours)."""
        found = self._candidates(frame)
        return self.rules[found[0]].category if found else None
