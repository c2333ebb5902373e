"""The `emulated` GPU source: the emulated GPU's own step log (emulated-gpu.jsonl, written
by cputax's plugin inside vLLM) as GPU busy samples, so GPU busy, stalls and their
attribution run on it as on NVML or amdsmi.

Each step becomes a window at 100% busy and the time since the previous step a window at
0%, with explicit `t0_ns` (the shape GPM windows have). The stamps are exact; the analysis
bins them at RESOLUTION_MS. The time after the last step is written as idle at close: a
step is logged when it ends, so only then is the tail known.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, ClassVar

from cputax.emulation.steps import read_steps
from cputax.telemetry.base import (
    BusySeries,
    Poller,
    Sample,
    TelemetryUnavailable,
    register_source,
    sample_kind,
)

__all__ = ["RESOLUTION_MS", "EmulatedBusy", "EmulatedPoller"]

RESOLUTION_MS = 1.0
DEV = 0


@sample_kind
class EmulatedBusy(Sample, tag="emulated"):
    """A window of the emulated GPU: 100% busy during a step, 0% between steps."""

    t0_ns: int
    dev: int
    busy: float
    # the best GPU source of all: a run that has it uses only it
    busy_series: ClassVar[BusySeries] = BusySeries(
        field="busy",
        label="emulated GPU steps (emulated-gpu.jsonl)",
        series="steps",
        rank=0,
        exclusive=True,
    )


class EmulatedPoller:
    name = "emulated"

    def __init__(self, path: Path, interval_s: float = 0.1) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._offset = 0
        self._last_end: int | None = None
        self._steps = 0

    def open(self) -> dict[str, Any]:
        if not self.path.parent.is_dir():
            raise TelemetryUnavailable(
                f"no folder for the emulated GPU's steps ({self.path.parent})"
            )
        self._last_end = time.monotonic_ns()  # before this, nothing is known
        return {
            "devices": [{"index": DEV, "name": "emulated GPU (cputax.emulation)"}],
            "path": str(self.path),
        }

    def _window(self, t0: int, t1: int, busy: float) -> Sample:
        return EmulatedBusy(t_ns=t1, t0_ns=t0, src=self.name, dev=DEV, busy=busy)

    def poll(self) -> list[Sample]:
        out: list[Sample] = []
        for step, offset in read_steps(self.path, self._offset):
            self._offset = offset
            if self._last_end is not None and step.t0_ns > self._last_end:
                out.append(self._window(self._last_end, step.t0_ns, 0.0))
            if self._last_end is None or step.t1_ns > self._last_end:
                out.append(self._window(max(step.t0_ns, self._last_end or 0), step.t1_ns, 100.0))
                self._last_end = step.t1_ns
            self._steps += 1
        return out

    def drain(self) -> list[Sample]:
        """The last samples, once polling stopped: the steps not read yet, then the time
        since the last step as idle."""
        tail = self.poll()
        now = time.monotonic_ns()
        if self._last_end is not None and now > self._last_end:
            tail.append(self._window(self._last_end, now, 0.0))
            self._last_end = now
        return tail

    def close(self) -> dict[str, Any]:
        basis = f"exact step stamps ({self._steps} steps), binned at {RESOLUTION_MS:g} ms"
        return {
            "steps": self._steps,
            "series": {str(DEV): {"steps": {"resolution_ms": RESOLUTION_MS, "basis": basis}}},
        }


@register_source("emulated")
def from_sources(sources: dict[str, Any]) -> Poller | None:
    """The emulated GPU's poller when the run names its step log (`emulated_gpu`)."""
    path = sources.get("emulated_gpu")
    return EmulatedPoller(Path(path)) if path else None
