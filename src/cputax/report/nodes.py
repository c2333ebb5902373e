"""The report's section for a Ray run's server nodes: per node its clock, telemetry and
where its server's CPU time went, as the run's own sections show them for this machine."""

from __future__ import annotations

import re

from cputax.records import Results
from cputax.report.profiling import window_text
from cputax.report.telemetry import render_telemetry
from cputax.results.nodes import NodeClock

__all__ = ["nodes_section"]

ABOUT = """\
Each server node ran a node agent (a Ray actor) with the same monitors as a local run:
host (and GPU) telemetry and py-spy on that node's server processes. Its files are under
`nodes/<node>/`. Every time from a node was converted once to this machine's monotonic
clock with the offset estimated over Ray round trips at the start and the end of the run
(the smallest round trip of 16 each; drift interpolated); the error bound below is how
far a node's time can be off against the client's, and so against any figure that
compares the two machines."""


def _demote(text: str, levels: int = 2) -> str:
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", text, flags=re.M)


def _clock_line(clock: NodeClock | None) -> str:
    if clock is None:
        return "_no clock estimate: this node's times could not be converted_"
    if not clock.converted:
        return (
            "_this node's times were not converted (the run stopped before its clock was "
            "estimated)_"
        )
    if clock.same_machine:
        return "Clock: the driver's own machine (one kernel, one clock): no conversion error."
    drift, spread = clock.drift_ppm, clock.drift_error_ppm
    drift_text = (
        f", drift {drift:+.2f} ± {spread:.2f} ppm"
        if drift is not None and spread is not None
        else ""
    )
    return (
        f"Clock: offset {(clock.offset_ns or 0) / 1e6:+.3f} ms to the driver, error bound "
        f"± {(clock.error_ns or 0) / 1e3:.0f} µs{drift_text}."
    )


def nodes_section(results: Results) -> str | None:
    if not results.nodes:
        return None
    parts = ["## Server nodes (Ray)", "", ABOUT, ""]
    for name, node in results.nodes.items():
        clock = node.clock
        parts += [f"### Node {name}", "", _clock_line(clock), ""]
        if clock is not None and clock.error:
            parts += [
                f"_The node agent stopped ({clock.error}); what it shipped before is below._",
                "",
            ]
        if node.correlation and (telemetry := render_telemetry(node.correlation)):
            parts += [_demote(telemetry), ""]
        attribution = node.attribution
        if attribution is None:
            parts += ["_py-spy recorded nothing on this node._", ""]
            continue
        for window in attribution.windows:
            parts += [_demote(window_text(window, attribution.rate), 1), ""]
    return "\n".join(parts).rstrip()
