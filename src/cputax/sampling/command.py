"""`cputax profile` and `cputax attribute`."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
from rich.console import Console

from cputax.analysis.attribution import attribute_file, attribute_run
from cputax.errors import CputaxError
from cputax.records import write_json
from cputax.report.profiling import attribution_text, file_text
from cputax.sampling.monitor import PROFILE_WINDOW, Discovery, PyspyMonitor
from cputax.sampling.pyspy import SamplerConfig


def profile(discovery: Discovery, duration_s: float, out: Path, config: SamplerConfig) -> int:
    """Sample a running server for duration_s (while the user's own load runs), then attribute."""
    console = Console(stderr=True)
    if (out / "pyspy" / "manifest.jsonl").exists():
        raise CputaxError(f"{out} already holds a profile; choose another --out (nothing was overwritten)")
    monitor = PyspyMonitor(config, discovery, console)
    monitor.start(out, {"kind": "external"})
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
        write_json(out / "pyspy" / "profile.json", {"started_ns": t0, "duration_s": duration_s, **monitor.stop()})
    result = attribute_run(out)
    if result is None:
        raise CputaxError(f"py-spy recorded nothing (see the logs under {out / 'pyspy'})")
    print(attribution_text(result, out))
    console.print(f"wrote {out / 'pyspy' / 'attribution.json'} and the flamegraphs under {out / 'pyspy'}")
    return 0


def attribute(path: Path, server: str, rate: float | None, as_json: bool = False) -> int:
    """Classify one py-spy raw or chrometrace file and print the shares."""
    if not path.is_file():
        raise CputaxError(f"{path}: no such file")
    result = attribute_file(path, server, rate)
    if as_json:
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    else:
        print(file_text(result))
    return 0
