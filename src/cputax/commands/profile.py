"""`cputax profile`: py-spy on a running server's processes while the user's own load runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from rich.console import Console

from cputax.analysis.attribution import attribute_run
from cputax.errors import CputaxError
from cputax.report.profiling import attribution_text
from cputax.rundir import RunDir
from cputax.sampling.pyspy import SamplerConfig
from cputax.sampling.pyspy_monitor import PROFILE_WINDOW, Discovery, PyspyMonitor, PyspyOptions
from cputax.telemetry.runner import TelemetryConfig

if TYPE_CHECKING:
    from cputax.cluster.agents import NodesMonitor
    from cputax.cluster.ray_env import RayOptions

__all__ = ["profile"]


def profile(
    discovery: Discovery,
    duration_s: float,
    out: Path | None,
    config: SamplerConfig,
    ray: RayOptions | None = None,
) -> int:
    """Sample a running server for duration_s (while the user's own load runs), then attribute."""
    if ray is not None:
        return _profile_nodes(discovery, duration_s, out, config, ray)
    console = Console(stderr=True)
    run = RunDir.create(out, prefix="profile-")
    monitor = PyspyMonitor(config, discovery, console)
    monitor.start(run, {"kind": "external"})
    if monitor.problem:
        raise CputaxError(monitor.problem)
    console.print(
        f"sampling for {duration_s:g} s (Ctrl-C stops early and keeps what was sampled)..."
    )
    t0, _ = _sample(monitor, duration_s, console)
    run.write(run.profile_info, {"started_ns": t0, "duration_s": duration_s, **monitor.stop()})
    result = attribute_run(run)
    if result is None:
        raise CputaxError(f"py-spy recorded nothing (see the logs under {run.pyspy})")
    result.dump(run.attribution)
    print(attribution_text(result, run.path))
    console.print(f"wrote {run.attribution} and the flamegraphs under {run.pyspy}")
    return 0


def _sample(
    monitor: PyspyMonitor | NodesMonitor, duration_s: float, console: Console
) -> tuple[int, int]:
    """The one profile window, until `duration_s` has passed or Ctrl-C: its start and end (ns)."""
    t0 = time.monotonic_ns()
    monitor.scenario_start(PROFILE_WINDOW, t0)
    try:
        time.sleep(duration_s)
    except KeyboardInterrupt:
        console.print("stopping early")
    t1 = time.monotonic_ns()
    monitor.scenario_end(PROFILE_WINDOW, t1)
    return t0, t1


def _profile_nodes(
    discovery: Discovery,
    duration_s: float,
    out: Path | None,
    config: SamplerConfig,
    ray: RayOptions,
) -> int:
    """`cputax profile --ray`: a node agent samples each server node (cluster.agents); files
    under nodes/<node>/, an attribution per node."""
    from cputax.cluster.agents import NodesMonitor
    from cputax.cluster.ray_env import Cluster

    if discovery.pid is not None:
        raise CputaxError(
            "--pid names a process on this host, not on the server nodes: with --ray give --port "
            "or --target, and each node's agent finds the server there"
        )
    console = Console(stderr=True)
    run = RunDir.create(out, prefix="profile-")
    with Cluster(ray) as cluster:
        nodes = cluster.server_nodes()
        if not nodes:
            raise CputaxError(
                "no server nodes: give --server-nodes NODE[:PORT],... or start the server "
                "nodes' Ray with --resources '{\"cputax-server\": 1}'"
            )
        target = {
            "kind": "external",
            "server": None if discovery.server == "auto" else discovery.server,
        }
        if discovery.port:
            target["endpoint"] = f"http://127.0.0.1:{discovery.port}"
        monitor = NodesMonitor(
            cluster, nodes, TelemetryConfig(gpu="none"), PyspyOptions(config, discovery)
        )
        monitor.start(run, target)
        console.print(
            f"sampling {len(nodes)} node(s) for {duration_s:g} s (Ctrl-C stops early "
            "and keeps what was sampled)..."
        )
        t0, t1 = _sample(monitor, duration_s, console)
        run.windows.write_bytes(
            orjson.dumps({"scenario": PROFILE_WINDOW, "start_ns": t0, "end_ns": t1, "sent": 0})
            + b"\n"
        )
        run.write(
            run.profile_info, {"started_ns": t0, "duration_s": duration_s, "nodes": monitor.stop()}
        )
    found = 0
    for node_run in run.nodes():
        result = attribute_run(node_run)
        if result is None:
            console.print(f"{node_run.path.name}: py-spy recorded nothing (see {node_run.pyspy})")
            continue
        found += 1
        result.dump(node_run.attribution)
        print(f"## node {node_run.path.name}\n")
        print(attribution_text(result, node_run.path))
    if not found:
        raise CputaxError(f"py-spy recorded nothing on any node (see {run.path / 'nodes'})")
    console.print(f"wrote the attribution and flamegraphs of each node under {run.path / 'nodes'}")
    return 0
