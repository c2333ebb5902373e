"""Every py-spy share carries its support: samples, empty stacks, a Wilson interval; a
thread with too few samples reads "too few samples (n)", never 0.0%."""

from __future__ import annotations

from collections import Counter

import pytest

from cputax.analysis.attribution import columns, summarize
from cputax.analysis.support import MIN_SAMPLES, agrees, wilson
from cputax.report.profiling import thread_table
from cputax.results.attribution import ThreadRow
from cputax.sampling.classify import Frame, classifier_for
from cputax.sampling.stacks import ThreadId


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    lo, hi = wilson(0.0, 94)  # none seen in 94 samples is not "0%": up to ~3.9%
    assert lo == 0.0 and hi == pytest.approx(0.0393, abs=1e-3)
    assert wilson(0.3, 0) == (0.0, 1.0)
    wide, narrow = wilson(0.3, 50), wilson(0.3, 5000)
    assert wide[1] - wide[0] > 5 * (narrow[1] - narrow[0])


def test_schedstat_outside_the_interval_disagrees():
    assert agrees(0.80, 1000, 0.82)
    assert not agrees(0.34, 1000, 0.82)  # issue 17's worker: py-spy 34% busy, host 82% of a core


STACK = (
    Frame("EngineCore.step", "vllm/v1/engine/core.py"),
    Frame("Scheduler.schedule", "vllm/v1/core/sched/scheduler.py"),
)
IDLE = (Frame("select", "selectors.py"),)


def _rows(samples: int, empty: int) -> list[ThreadRow]:
    stacks = Counter({STACK: samples - empty - 10, IDLE: 10, (): empty})
    threads = {("engine_core 1", ThreadId(1, 2, "MainThread")): stacks}
    return summarize(threads, classifier_for("vllm")).threads


def test_rows_carry_samples_empty_stacks_and_intervals():
    row = _rows(1000, 40)[0]
    assert row.samples == 1000 and row.empty == 40 and not row.too_few
    lo, hi = row.intervals["schedule"]
    assert lo < row.categories["schedule"] < hi
    assert row.active_interval[0] < row.active < row.active_interval[1]


def test_a_thread_with_too_few_samples_is_never_a_share():
    few = _rows(MIN_SAMPLES - 6, 30)[0]
    assert few.too_few
    text = thread_table([few], columns([few]))
    assert f"too few samples ({few.samples})" in text and "0.0%" not in text and "30 empty" in text
    rows = _rows(1000, 0)
    enough = thread_table(rows, columns(rows))
    assert "too few" not in enough and "[" in enough  # the busy share's interval
