"""`cputax profile`: py-spy on a running server's processes while the user's own load runs."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from cputax.analysis.attribution import attribute_run
from cputax.errors import CputaxError
from cputax.report.profiling import attribution_text
from cputax.rundir import RunDir
from cputax.sampling.pyspy import SamplerConfig
from cputax.sampling.pyspy_monitor import PROFILE_WINDOW, Discovery, PyspyMonitor

__all__ = ["profile"]


def profile(discovery: Discovery, duration_s: float, out: Path | None, config: SamplerConfig) -> int:
    """Sample a running server for duration_s (while the user's own load runs), then attribute."""
    console = Console(stderr=True)
    run = RunDir.create(out, prefix="profile-")
    monitor = PyspyMonitor(config, discovery, console)
    monitor.start(run, {"kind": "external"})
    if monitor.problem:
        raise CputaxError(monitor.problem)
    console.print(f"sampling for {duration_s:g} s (Ctrl-C stops early and keeps what was sampled)...")
    t0 = time.monotonic_ns()
    monitor.scenario_start(PROFILE_WINDOW, t0)
    try:
        time.sleep(duration_s)
    except KeyboardInterrupt:
        console.print("stopping early")
    finally:
        monitor.scenario_end(PROFILE_WINDOW, time.monotonic_ns())
        run.write(run.profile_info, {"started_ns": t0, "duration_s": duration_s, **monitor.stop()})
    result = attribute_run(run)
    if result is None:
        raise CputaxError(f"py-spy recorded nothing (see the logs under {run.pyspy})")
    run.write(run.attribution, result)
    print(attribution_text(result, run.path))
    console.print(f"wrote {run.attribution} and the flamegraphs under {run.pyspy}")
    return 0
