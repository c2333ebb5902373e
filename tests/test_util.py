"""The shared helpers of cputax.util that many layers lean on."""

import asyncio
import math
import time

import numpy as np
import pytest

from cputax.util import average, sleep_until


def test_average_leaves_out_what_is_absent():
    assert average([1.0, 2.0, 6.0]) == 3.0
    assert average([1.0, None, math.nan, 3.0]) == 2.0  # absent, never zero
    assert average(v for v in (4, 8)) == 6.0  # any iterable, read once
    assert average([]) is None and average([None, math.nan]) is None


def test_average_of_a_numpy_column_matches_the_list():
    column = np.array([0.5, np.nan, 2.5, 9.0])
    assert average(column) == pytest.approx(4.0)
    assert isinstance(average(column), float)
    assert average(np.array([np.nan])) is None and average(np.array([], dtype=float)) is None


def test_sleep_until_a_deadline_and_not_past_one():
    async def run() -> tuple[int, int]:
        deadline = time.monotonic_ns() + 50_000_000
        await sleep_until(deadline)
        woke = time.monotonic_ns()
        t0 = time.monotonic_ns()
        await sleep_until(t0 - 10**9)  # passed a second ago: at once
        return woke - deadline, time.monotonic_ns() - t0

    late, passed = asyncio.run(run())
    assert late >= -1_000_000  # not early (asyncio's timers may fire within the clock's resolution)
    assert passed < 500_000_000  # a passed deadline is no wait (not a second's, its distance)
