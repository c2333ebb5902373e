"""Sampling the server's processes with py-spy, and classifying what each sample shows.

    pyspy          one `py-spy record` per process: start, stop, read what it said
    pyspy_monitor  what `cputax run --pyspy` and `cputax profile` drive, window by window
    stacks         py-spy's formats in and out (chrometrace, raw, speedscope)
    classify       a server's rule table (cputax.servers) applied to a stack
    flamegraph     the SVG flamegraph, coloured by category

The rule tables themselves are data, one per server, in cputax.servers.
"""

from cputax.sampling.classify import (
    Classifier,
    Frame,
    Stack,
    classifier_for,
    detect_server,
    short_path,
)
from cputax.sampling.pyspy import (
    DEFAULT_RATE,
    INSTALL_HINT,
    SamplerConfig,
    find_pyspy,
    ptrace_problem,
)
from cputax.sampling.pyspy_monitor import PROFILE_WINDOW, Discovery, PyspyMonitor, PyspyOptions
from cputax.sampling.stacks import ThreadId, Timeline, clip, collapse, read_chrometrace, read_raw

__all__ = [
    "DEFAULT_RATE",
    "INSTALL_HINT",
    "PROFILE_WINDOW",
    "Classifier",
    "Discovery",
    "Frame",
    "PyspyMonitor",
    "PyspyOptions",
    "SamplerConfig",
    "Stack",
    "ThreadId",
    "Timeline",
    "classifier_for",
    "clip",
    "collapse",
    "detect_server",
    "find_pyspy",
    "ptrace_problem",
    "read_chrometrace",
    "read_raw",
    "short_path",
]
