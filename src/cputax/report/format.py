"""How every report writes a number: one place, so that a missing value reads the same
everywhere ("absent", never zero) and a table is a markdown table."""

from __future__ import annotations

import re

from cputax.results.summary import ScenarioSummary

__all__ = [
    "ABSENT",
    "WITHHELD",
    "fraction",
    "instant",
    "ms",
    "number",
    "pct",
    "ratio_cell",
    "scenario_cell",
    "share",
    "signed_pct",
    "table",
]

ABSENT = "absent"
WITHHELD = "withheld"  # a ratio of a scenario whose records break the run's invariants


def number(value: float | None, digits: int = 0) -> str:
    """1,234 (digits after the point as asked), or absent."""
    return ABSENT if value is None else f"{value:,.{digits}f}"


def ms(value: float | None) -> str:
    """Milliseconds: one decimal under 100, none above."""
    if value is None:
        return ABSENT
    return f"{value:,.1f}" if value < 100 else f"{value:,.0f}"


def instant(seconds: float, span: float | None) -> str:
    """A moment on a timeline of `span` seconds: two decimals on one shorter than 10 s."""
    digits = 2 if span is not None and span < 10 else 0
    return f"{seconds:,.{digits}f}"


def pct(value: float | None) -> str:
    """A percentage already in 0..100."""
    return ABSENT if value is None else f"{value:.1f}%"


def scenario_cell(s: ScenarioSummary) -> str:
    """A scenario's name, marked when its records break the run's invariants (the count)."""
    inv = s.invariants
    if inv is None or inv.ok:
        return s.name
    return f"{s.name} ⚠ {inv.broken}/{inv.checked} invalid"


def ratio_cell(s: ScenarioSummary, key: str) -> str:
    """CPU% / GPU% (`key`: "cpu_pct" or "gpu_pct") of a scenario summary; "withheld" where its
    records break the invariants."""
    return WITHHELD if s.withheld else pct(getattr(s, key))


def fraction(value: float | None) -> str:
    """A fraction in 0..1 as a percentage."""
    return ABSENT if value is None else f"{100 * value:.1f}%"


def signed_pct(value: float | None) -> str:
    return ABSENT if value is None else f"{value:+.1f}%"


def share(value: float | None, zero: str = "") -> str:
    """A share (0..1) of a thread's time for a table cell: blank when None, `zero` when under
    0.5%."""
    if value is None:
        return ""
    if value < 0.005:
        return zero
    return f"{100 * value:.0f}%" if value >= 0.1 else f"{100 * value:.1f}%"


_NUMERIC = re.compile(r"^(?:[-+~]?[\d.,]+\S*(?:\s+\S+)?|absent|-|)$")


def _numeric(rows: list[list[str]], column: int) -> bool:
    cells = [row[column].strip() for row in rows if column < len(row)]
    return (
        bool(cells)
        and all(_NUMERIC.match(c) for c in cells)
        and any(c[:1].isdigit() for c in cells)
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; columns of numbers are right-aligned (`---:`), text stays left."""
    marks = ["---:" if i and _numeric(rows, i) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
