"""What cputax knows about each server type: one table per server, as data.

The ground floor of the package: targets, sampling, analysis and the stub read these
tables and nothing here imports them back. See `base.ServerTable` for what a table holds.
"""

from __future__ import annotations

import re

from cputax.servers import sglang, stub, transformers, vllm
from cputax.servers.base import (
    CATEGORIES,
    IDLE,
    MEANINGS,
    OTHER,
    WAITS,
    Capabilities,
    Component,
    Function,
    Launch,
    MetricNames,
    Preset,
    Rule,
    ServerTable,
    Tracing,
)
from cputax.servers.common import COMMON_RULES

__all__ = [
    "CATEGORIES",
    "COMMON_RULES",
    "IDLE",
    "MEANINGS",
    "OTHER",
    "SERVERS",
    "SERVER_NAMES",
    "WAITS",
    "Capabilities",
    "Component",
    "Function",
    "Launch",
    "MetricNames",
    "Preset",
    "Rule",
    "ServerTable",
    "Tracing",
    "embedded_names",
    "get",
    "metric_names",
    "process_role",
    "role_in",
    "rules_for",
]

# Real servers first: `auto` discovery and metric lookup try them in this order.
SERVERS: dict[str, ServerTable] = {
    t.name: t for t in (vllm.TABLE, sglang.TABLE, transformers.TABLE)
}
SERVER_NAMES = tuple(SERVERS)
STUB = stub.TABLE


def role_in(cmdline: str, table: ServerTable) -> str | None:
    """The role a process plays in `table`'s server, from its /proc cmdline (NULs as spaces)."""
    return next((role for role, pattern in table.processes if re.search(pattern, cmdline)), None)


def process_role(cmdline: str) -> tuple[str, str] | None:
    """(server, role) of a process by its cmdline, the first real server whose titles match."""
    for table in SERVERS.values():
        if role := role_in(cmdline, table):
            return table.name, role
    return None


def get(name: str) -> ServerTable:
    """The table of a server type (vllm, sglang, transformers, stub)."""
    if name == STUB.name:
        return STUB
    return SERVERS[name]


def rules_for(server: str) -> tuple[Rule, ...]:
    """The server's own rules first, then the shared ones."""
    return get(server).rules + COMMON_RULES


def embedded_names() -> tuple[str, ...]:
    """The servers cputax can start itself (`--target`)."""
    return tuple(name for name, table in SERVERS.items() if table.launch is not None)


def metric_names() -> MetricNames:
    """Every server's names per quantity, real servers in SERVERS order: a scrape of an
    unknown server is read with whichever names it has."""
    merged: dict[str, dict[str, tuple[str, ...]]] = {"histograms": {}, "counters": {}, "gauges": {}}
    for table in SERVERS.values():
        for kind, names in merged.items():
            for quantity, found in getattr(table.metrics, kind).items():
                names[quantity] = names.get(quantity, ()) + tuple(
                    n for n in found if n not in names.get(quantity, ())
                )
    return MetricNames(**merged)
