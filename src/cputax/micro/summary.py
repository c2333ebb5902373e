"""The summary of a pyperf results file, in the units a person wants per benchmark.

pyperf stores seconds per call of the step. People think in tokens/s for
tokenization, ms per request for JSON and hashing, us per chunk for SSE and us
per token for detokenization, so every case declares a `Report` and `display`
converts. The study's published figures (its section 3.3 and 3.4 tables) are
kept in the same form, seconds per call of the matching case, so they go
through the same conversion and sit in the same column.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyperf
from rich.table import Table
from rich.text import Text

from cputax.micro.harness import SUITES, Report, suite_cases

# Seconds per call of the case the study's number corresponds to.
STUDY_SECONDS: dict[str, float] = {
    "tokenize.encode[679]": 1.18e-3,
    "tokenize.encode[2711]": 5.09e-3,
    "tokenize.encode[5423]": 10.35e-3,
    "tokenize.encode[10840]": 20.46e-3,
    "tokenize.encode[21679]": 42.72e-3,
    "tokenize.encode[43359]": 87.85e-3,
    "tokenize.encode[67745]": 134.90e-3,
    "tokenize.encode[101615]": 220.38e-3,
    "json.build_stdlib[100000]": 0.82e-3,  # "JSON serialization (request build)"
    "hash.sha256_buffer[100000]": 0.62e-3,  # "SHA256 hash (cache key)": one buffer
    "sse.chunk_stdlib[content]": 1.9e-6,  # "SSE chunk parse (per token)"
    "detok.decode_each[128]": 0.27e-3,  # "Detokenization (128 tokens)": decode() per token
}

# unit -> (multiplier of seconds per item, or None for a rate in items per second)
UNITS: dict[str, float | None] = {
    "tokens/s": None,
    "ms/request": 1e3,
    "us/chunk": 1e6,
    "us/token": 1e6,
}
FALLBACK = Report("ms/call")


@functools.lru_cache(maxsize=1)
def reports() -> dict[str, Report]:
    return {case.name: case.report for suite in SUITES for case in suite_cases(suite)}


def convert(seconds: float, report: Report) -> float:
    """`seconds` per call in `report`'s unit (a rate, or a time per item)."""
    scale = UNITS.get(report.unit, 1e3)
    if scale is None:
        return report.per / seconds
    return seconds * scale / report.per


def display(name: str, seconds: float) -> tuple[float, str]:
    """Seconds per call of benchmark `name` -> (value, unit) for the summary."""
    report = reports().get(name, FALLBACK)
    return convert(seconds, report), report.unit


@dataclass(frozen=True)
class Row:
    name: str
    input_tokens: int | None
    mean: float  # seconds per call
    rel_stdev: float | None  # stdev / mean; None with a single value
    value: float
    unit: str
    study: float | None  # the study's figure, in `unit`
    study_ratio: float | None  # our time / the study's time


def rows(suite: pyperf.BenchmarkSuite) -> list[Row]:
    out = []
    for bench in suite.get_benchmarks():
        name = bench.get_name()
        mean = bench.mean()
        rel = bench.stdev() / mean if bench.get_nvalue() > 1 else None
        value, unit = display(name, mean)
        study_s = STUDY_SECONDS.get(name)
        tokens = bench.get_metadata().get("input_tokens")
        out.append(
            Row(
                name,
                tokens,
                mean,
                rel,
                value,
                unit,
                display(name, study_s)[0] if study_s else None,
                mean / study_s if study_s else None,
            )
        )
    return out


def _seconds(value: float) -> str:
    for scale, unit in ((1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value * 1e9:.3g} ns"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def table(path: Path) -> Table:
    """A rich table of every benchmark in the pyperf JSON file at `path`."""
    t = Table(title=f"cputax micro: {path}", title_justify="left")
    t.add_column("benchmark", no_wrap=True)
    t.add_column("tokens", justify="right")
    t.add_column("time/call", justify="right", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("study", justify="right", no_wrap=True)
    t.add_column("vs study", justify="right")
    for row in rows(pyperf.BenchmarkSuite.load(str(path))):
        spread = f" ±{row.rel_stdev:.0%}" if row.rel_stdev is not None else ""
        t.add_row(
            Text(row.name),  # not markup: "[role]" would be read as a style
            f"{row.input_tokens:,}" if row.input_tokens else "",
            _seconds(row.mean) + spread,
            f"{_number(row.value)} {row.unit}",
            _number(row.study) if row.study is not None else "",
            f"{row.study_ratio:.2f}x time" if row.study_ratio is not None else "",
        )
    return t
