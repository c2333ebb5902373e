"""`python -m cputax.micro SUITE [pyperf options]`: what `cputax micro` runs per suite.

A module rather than the bench/ scripts so an installed cputax (no checkout) can
run its suites; workers are re-launched the same way through `program_args`.
"""

from __future__ import annotations

import sys

from cputax.micro.harness import SUITES, run_suite


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        print(
            f"usage: python -m cputax.micro {{{','.join(SUITES)}}} [pyperf options]",
            file=sys.stderr,
        )
        return 2
    suite = argv[0]
    run_suite(suite, argv[1:], program_args=("-m", "cputax.micro", suite))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
