"""What runs beside the load: samplers and pollers that watch the server during a run.

`cputax run` calls every monitor at the same points, so py-spy sampling and
telemetry plug in without touching the load loop. A monitor writes its own files
under the run directory as it goes (results survive a crash) and returns a small
dict of metadata at stop, stored in run.json under its name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Monitor(Protocol):
    name: str

    def start(self, out: Path, target: dict[str, Any]) -> None:
        """Before the first scenario. `target` has `kind` ("embedded"/"external") and, when
        known, `pid` of the server process and `endpoint`."""

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        """A scenario's measured part begins (monotonic ns)."""

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        """A scenario's measured part ended (monotonic ns)."""

    def stop(self) -> dict[str, Any]:
        """After the last scenario (also on error or Ctrl-C): flush, stop, return metadata."""
