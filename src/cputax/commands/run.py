"""`cputax run`: drive a server through a load profile and decompose every request."""

from __future__ import annotations

from cputax.session import RunOptions, exit_status, run_profile

__all__ = ["run"]


def run(opts: RunOptions) -> int:
    return exit_status(run_profile(opts))
