"""whatif.json: what a what-if experiment found, owned by one class (as pyperf's Benchmark
owns its file): `WhatIf.dump(path)`, `WhatIf.load(path)`.

Format versions:
- 1: info, slowdown (the added time against k * d per component), results (per component
  and scenario: own time, points, per metric the fit, the predicted effects and the
  back-test), placebo (per scenario), claims (one row per study claim and scenario), notes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError
from cputax.records import read_json, write_json

__all__ = ["FORMAT_VERSION", "Effect", "Fit", "WhatIf"]

FORMAT_VERSION = 1


@dataclass
class Fit:
    """A metric against the added time per request (ms): y = intercept + slope * x, with the
    slope's 95% interval; `curvature_t` is the t value of a quadratic term (None: fewer than
    three slowdowns), `linear` False when that term is significant."""

    slope: float
    slope_lo: float
    slope_hi: float
    intercept: float
    points: int
    r2: float | None
    curvature_t: float | None = None
    linear: bool | None = None


@dataclass
class Effect:
    """A predicted change of a metric (its unit) and in % of the unslowed value, with 95%
    intervals."""

    value: float
    lo: float
    hi: float
    pct: float | None
    pct_lo: float | None
    pct_hi: float | None


@dataclass
class WhatIf:
    info: dict[str, Any] = field(default_factory=dict)
    slowdown: dict[str, Any] = field(default_factory=dict)  # component -> added vs asked
    results: list[dict[str, Any]] = field(default_factory=list)
    placebo: dict[str, Any] = field(default_factory=dict)  # scenario -> the placebo's effects
    claims: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dump(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> WhatIf:
        data = read_json(path)
        version = data.get("format_version") if isinstance(data, dict) else None
        if version != FORMAT_VERSION:
            raise CputaxError(
                f"{path}: whatif.json format {version!r}, this cputax reads {FORMAT_VERSION}; "
                "rebuild it with `cputax whatif --report DIR`"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
