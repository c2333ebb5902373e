"""One clock for a run that spans nodes: each node's CLOCK_MONOTONIC mapped onto the driver's.

Every node counts its monotonic clock from its own boot, so a node's timestamps mean
nothing on the driver until shifted. The offset is estimated over Ray round trips, like
NTP's: the driver reads its clock (t0), asks the node for its clock (r), reads again
(t1); the node read r somewhere in [t0, t1], so offset = r - (t0 + t1) / 2 is good to
half the round trip. Of several round trips the one with the smallest RTT is kept. The
estimate is taken at the start and at the end of the run: their difference over the
time between them is the drift, and a node time is converted with the offset
interpolated between the two. The error bound of a converted time is the larger of the
two halves of the round trips plus what the drift could add between them, and is shown
next to every figure that compares times of two nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cputax.records import TIMES

__all__ = ["NodeClock", "Offset", "measure", "shift_line", "shift_record"]

SAMPLES = 16


@dataclass(frozen=True)
class Offset:
    """node clock - driver clock at driver time `at_ns`, good to +- error_ns."""

    offset_ns: int
    error_ns: int
    rtt_ns: int
    at_ns: int


def measure(
    node_now: Callable[[], int], driver_now: Callable[[], int], samples: int = SAMPLES
) -> Offset:
    """The offset of the clock `node_now` reads against `driver_now`, from the round trip
    with the smallest RTT of `samples`."""
    best: Offset | None = None
    for _ in range(samples):
        t0 = driver_now()
        remote = node_now()
        t1 = driver_now()
        rtt = t1 - t0
        if best is None or rtt < best.rtt_ns:
            best = Offset(
                offset_ns=remote - (t0 + t1) // 2,
                error_ns=(rtt + 1) // 2,
                rtt_ns=rtt,
                at_ns=(t0 + t1) // 2,
            )
    assert best is not None
    return best


@dataclass(frozen=True)
class NodeClock:
    """A node's clock against the driver's, from the estimates at start (and end)."""

    node: str
    start: Offset
    end: Offset | None = None

    @classmethod
    def of_driver(cls, node: str, at_ns: int) -> NodeClock:
        """A node that is the driver's own machine: one kernel, one clock, no offset to estimate."""
        return cls(node, Offset(0, 0, 0, at_ns), Offset(0, 0, 0, at_ns))

    def with_end(self, end: Offset) -> NodeClock:
        return NodeClock(self.node, self.start, end)

    @property
    def drift_ppm(self) -> float | None:
        if self.end is None or self.end.at_ns <= self.start.at_ns:
            return None
        return (
            1e6 * (self.end.offset_ns - self.start.offset_ns) / (self.end.at_ns - self.start.at_ns)
        )

    @property
    def drift_error_ppm(self) -> float | None:
        """How far the drift can be off: both estimates' errors over the time between them."""
        if self.end is None or self.end.at_ns <= self.start.at_ns:
            return None
        return 1e6 * (self.start.error_ns + self.end.error_ns) / (self.end.at_ns - self.start.at_ns)

    @property
    def error_ns(self) -> int:
        """How far a converted time can be off: the worse round trip, and between the two
        estimates the part of the drift the interpolation might not follow."""
        if self.end is None:
            return self.start.error_ns
        return max(self.start.error_ns, self.end.error_ns)

    def offset_at(self, t_driver: int) -> float:
        if self.end is None or self.end.at_ns <= self.start.at_ns:
            return float(self.start.offset_ns)
        share = (t_driver - self.start.at_ns) / (self.end.at_ns - self.start.at_ns)
        return self.start.offset_ns + share * (self.end.offset_ns - self.start.offset_ns)

    def to_driver(self, t_node: int) -> int:
        guess = t_node - self.start.offset_ns  # the driver time, to within the drift
        guess = t_node - self.offset_at(guess)  # again: off by drift x drift now (below 1e-9)
        return int(round(t_node - self.offset_at(guess)))

    def to_node(self, t_driver: int) -> int:
        return int(round(t_driver + self.offset_at(t_driver)))

    def as_dict(self) -> dict[str, Any]:
        """What run.json keeps per node (`clocks`)."""
        return {
            "node": self.node,
            "offset_ns": self.start.offset_ns,
            "error_ns": self.error_ns,
            "drift_ppm": self.drift_ppm,
            "drift_error_ppm": self.drift_error_ppm,
            "start": asdict(self.start),
            "end": asdict(self.end) if self.end else None,
        }


def shift_record(record: dict[str, Any], clock: NodeClock) -> dict[str, Any]:
    """A request record from a node, its instants (records.TIMES, and `extra` keys ending in
    _ns: a replay's ready_ns, agent_start_ns; the calibration's token stamps) converted to
    the driver's clock."""
    for key in TIMES:
        if record.get(key) is not None:
            record[key] = clock.to_driver(record[key])
    extra = record.get("extra") or {}
    for key, value in extra.items():
        if key.endswith("_ns") and isinstance(value, int):
            extra[key] = clock.to_driver(value)
    token_ns = extra.get("token_ns")
    if token_ns:
        extra["token_ns"] = [
            [clock.to_driver(a), None if b is None else clock.to_driver(b)] for a, b in token_ns
        ]
    return record


def shift_line(obj: dict[str, Any], clock: NodeClock) -> dict[str, Any]:
    """A telemetry sample or py-spy manifest line from a node, converted: by the convention
    both files keep, every top-level `*_ns` field is a monotonic instant except `time_ns`
    (the wall clock, left alone)."""
    for key, value in obj.items():
        if key.endswith("_ns") and key != "time_ns" and isinstance(value, int):
            obj[key] = clock.to_driver(value)
    return obj
