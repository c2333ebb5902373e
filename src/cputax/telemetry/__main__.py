"""The telemetry child process of `cputax run` (see runner.py)."""

import sys

from cputax.telemetry.runner import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
