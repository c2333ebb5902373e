"""report/ renders and computes nothing: every threshold, verdict and figure it shows was
made by analysis and stored on a result (src/cputax/results/).

The rule, checked on the source of every module under src/cputax/report/ with `ast`:

1. No threshold: no comparison (`<`, `>=`, `==`, `in` ...) has an operand that is a number
   other than 0 and 1: a literal (`> 0.05`, `< -10`), or a name or attribute the module binds
   to a number (`>= MIN_SHARE` where MIN_SHARE = 0.01). Checks against None, 0, 1, strings
   and flags stay allowed. report/format.py is the one exception: its comparisons choose
   how many digits a number is written with (ms: one decimal under 100), not a conclusion.
2. No ratio: no division (`/`, `//`) by anything but a numeric literal or `len(...)` (or a
   string: `folder / "name"` joins a path).
   Dividing by a literal is a change of unit (ns -> ms); dividing by a figure is a share,
   a mean or a rate computed in the renderer. `len` is allowed for plot geometry (a bar's
   width among N bars): with rule 3, no mean can be built from it.
3. No aggregate: no call to sum, max, min, statistics.*, math.fsum, and no import of numpy,
   statistics, cputax.util (percentile, average) or cputax.analysis. report/plots.py may
   call sum/max/min for geometry (figure size, stack bottoms, clamping a bar at 0); it is
   still held to rules 1, 2 and to the imports.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from types import ModuleType

import pytest

import cputax.report

REPORT = Path(cputax.report.__file__).parent
DIGITS_ONLY = {"format.py"}  # rule 1 exception: digits chosen by magnitude
GEOMETRY = {"plots.py"}  # rule 3 exception: sum/max/min for drawing
ALLOWED_NUMBERS = (0, 1)
AGGREGATES = {"sum", "max", "min", "fsum", "mean", "median", "fmean"}
FORBIDDEN_IMPORTS = ("numpy", "statistics", "cputax.util", "cputax.analysis")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _bound_number(node: ast.expr, namespace: dict[str, object]) -> object | None:
    """The number a name or dotted attribute stands for in the module, else None."""
    if isinstance(node, ast.Name):
        value = namespace.get(node.id)
    elif isinstance(node, ast.Attribute):
        owner = (
            _bound_number(node.value, namespace)
            if isinstance(node.value, ast.Attribute)
            else namespace.get(node.value.id)
            if isinstance(node.value, ast.Name)
            else None
        )
        value = getattr(owner, node.attr, None) if isinstance(owner, ModuleType) else None
    else:
        return None
    return value if _number(value) else None


def _numeric_operand(node: ast.expr, namespace: dict[str, object]) -> object | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        node = node.operand
    if isinstance(node, ast.Constant) and _number(node.value):
        return node.value
    return _bound_number(node, namespace)


def _is_len(node: ast.expr) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "len"


def violations(
    source: str, namespace: dict[str, object] | None = None, name: str = ""
) -> list[str]:
    """What breaks the rule (module docstring) in `source`; `namespace` resolves the names
    the module binds (its __dict__), `name` is its file name (for the two exceptions)."""
    namespace = namespace or {}
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Compare) and name not in DIGITS_ONLY:
            for operand in [node.left, *node.comparators]:
                value = _numeric_operand(operand, namespace)
                if value is not None and value not in ALLOWED_NUMBERS:
                    found.append(f"{where}: threshold {ast.unparse(node)}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div | ast.FloorDiv):
            divisor = node.right
            literal = isinstance(divisor, ast.Constant) and _number(divisor.value)
            path = isinstance(divisor, ast.JoinedStr) or (
                isinstance(divisor, ast.Constant) and isinstance(divisor.value, str)
            )
            if not (literal or path or _is_len(divisor)):  # `dir / "name"` joins a path
                found.append(f"{where}: ratio {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and name not in GEOMETRY:
            func = node.func
            called = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else None
            )
            if called in AGGREGATES:
                found.append(f"{where}: aggregate {ast.unparse(node)}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            for module in modules:
                if module.startswith(FORBIDDEN_IMPORTS):
                    found.append(f"{where}: imports {module}")
    return found


def _modules() -> list[Path]:
    return sorted(REPORT.glob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.name)
def test_report_module_computes_nothing(path: Path) -> None:
    module = (
        importlib.import_module(f"cputax.report.{path.stem}")
        if path.stem != "__init__"
        else cputax.report
    )
    assert violations(path.read_text(), vars(module), path.name) == []


PLANTED = """
import numpy as np
from cputax.util import percentile
MIN_SHARE = 0.01

def cell(value, total, rows):
    if value > 0.05:
        return "high"
    if value < -10 or value >= MIN_SHARE:
        return "low"
    share = value / total
    return f"{sum(rows)} {share}"
"""


def test_checker_finds_each_planted_break() -> None:
    namespace = {"MIN_SHARE": 0.01}
    found = violations(PLANTED, namespace, "planted.py")
    assert any("threshold value > 0.05" in f for f in found)
    assert any("value < -10" in f for f in found)
    assert any("value >= MIN_SHARE" in f for f in found)
    assert any("ratio value / total" in f for f in found)
    assert any("aggregate sum(rows)" in f for f in found)
    assert any("imports numpy" in f for f in found)
    assert any("imports cputax.util" in f for f in found)
    assert len(found) == 7  # nothing else: the clean lines are not flagged


def test_checker_allows_what_renders() -> None:
    clean = """
def cell(value, rows, ns):
    if value is None or value == 0 or len(rows) > 1 or value == "x":
        return "absent"
    return f"{100 * value:.1f}% {ns / 1e6:.2f} ms {0.8 / len(rows)}"
"""
    assert violations(clean, {}, "clean.py") == []


def test_exceptions_are_named_and_narrow() -> None:
    digits = "def ms(v):\n    return f'{v:.1f}' if v < 100 else f'{v:.0f}'\n"
    assert violations(digits, {}, "format.py") == []
    assert violations(digits, {}, "markdown.py") != []
    geometry = "w = max(6.0, 2 * n)\nr = 1 / total\n"
    assert [f for f in violations(geometry, {}, "plots.py")] == ["plots.py:2: ratio 1 / total"]
