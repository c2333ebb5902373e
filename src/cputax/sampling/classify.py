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
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from cputax.servers import COMMON_RULES, OTHER, SERVERS, Rule, rules_for

__all__ = [
    "Classifier",
    "Frame",
    "Stack",
    "classifier_for",
    "detect_server",
    "parse_frame",
    "short_path",
]

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
            return path[m.end() :]
    return path


def parse_frame(text: str) -> Frame:
    """One frame of a py-spy raw line: `func (path:line)`, `func (path)` with --nolineno."""
    m = _FRAME.match(text)
    if m is None:
        return Frame(text, "")
    return Frame(m["func"], short_path(m["path"]))


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


def classifier_for(server: str | None) -> Classifier:
    """The rule table of a server type (its own rules, then the shared ones); shared only
    when unknown."""
    return Classifier(rules_for(server) if server else COMMON_RULES)


def detect_server(stacks: Iterable[Mapping[Stack, float]]) -> str | None:
    """The server whose code the stacks run (most samples in its marker paths), or None."""
    markers = {
        name: Classifier([Rule(OTHER, glob) for glob in table.markers])
        for name, table in SERVERS.items()
    }
    scores: Counter[str] = Counter()
    for counter in stacks:
        for stack, weight in counter.items():
            for name, c in markers.items():
                if any(c.frame_category(f) for f in stack):
                    scores[name] += weight
    return scores.most_common(1)[0][0] if scores else None
