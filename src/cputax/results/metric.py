"""How a result names one of its measurements: a label and a unit for the report, and which
way is better. One small type, so that the sweep's and the what-if's tables of metrics are
the same kind of table (their own columns stay with them)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Metric"]


class Metric(NamedTuple):
    """A measurement as a report names it, e.g. Metric("output tokens/s", "tok/s", True)."""

    label: str
    unit: str
    higher_is_better: bool = False
