"""How much a py-spy share can be trusted: its sample count and a binomial interval.

A share of n samples is a binomial proportion; the Wilson score interval stays inside
0..1 and is honest at small n (94 samples, half of them empty, made "0.0% / 33.9%" look
like data in a sweep: issue 17). Below MIN_SAMPLES a share is not reported as a number.
"""

from __future__ import annotations

import math

__all__ = ["MIN_SAMPLES", "Z95", "agrees", "too_few", "wilson"]

MIN_SAMPLES = 100  # fewer samples than this: "too few samples (n)", never a share
Z95 = 1.959964


def wilson(share: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `share` seen in `n` samples."""
    if n <= 0:
        return 0.0, 1.0
    p = min(1.0, max(0.0, share))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def too_few(n: float) -> bool:
    return n < MIN_SAMPLES


def agrees(share: float, n: float, other: float, slack: float = 0.05) -> bool:
    """Whether `other` (e.g. schedstat's on-CPU share) lies within the interval of `share`
    widened by `slack` (the two clocks sample different moments of the same window)."""
    lo, hi = wilson(share, n)
    return lo - slack <= other <= hi + slack
