"""A Ray run's server node as analysis read it: the conversion of its clock to the driver's
(nodes/<node>/clock.json, written by cluster.agents), typed for the report."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["NodeClock"]


class NodeClock(msgspec.Struct, kw_only=True):
    """How a node's times were put on the driver's clock, and how far they can be off.

    `converted` is False when the run stopped before the node's clock was estimated;
    `same_machine` when the node is the driver's own machine (one kernel, one clock: no
    offset, no error); `error` is why the node agent stopped, if it did."""

    converted: bool = False
    same_machine: bool = False
    node: str | None = None
    offset_ns: int | None = None
    error_ns: int | None = None
    drift_ppm: float | None = None
    drift_error_ppm: float | None = None
    error: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NodeClock:
        """clock.json's content (cluster.agents; its `start`/`end` estimates are left out)."""
        known = {k: v for k, v in data.items() if k in cls.__struct_fields__}
        return msgspec.convert(known, cls)
