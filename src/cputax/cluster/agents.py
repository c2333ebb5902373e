"""Node agents: py-spy and the host/GPU pollers on every server node, their files shipped home.

One `NodeAgent` actor runs on each server node (cluster.ray_env picks them). It finds that
node's server processes with the same discovery as a local run (targets.processes: the
listener on the endpoint's port when that node has one, else the server's process
titles), and runs the same monitors there (sampling.pyspy_monitor, telemetry.runner)
into a run directory of its own on that node. After each scenario it ships the files
that scenario added, so a node lost later loses nothing finished; the driver writes them
under nodes/<node>/ in the run directory, in the same layout as the run's own.

`NodesMonitor` is the driver's side, a session.Monitor like the local ones: it starts the
agents, passes them each scenario's start and end (in their node's clock), estimates
every node's clock at start and end (cluster.clock), and once the run ends converts the
node's monotonic times to the driver's in place (telemetry.jsonl, pyspy/manifest.jsonl)
and records the conversion in nodes/<node>/clock.json and run.json. An agent that fails
is named in one line; the other nodes go on.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from rich.console import Console

from cputax.cluster.clock import NodeClock, Offset, measure, shift_line
from cputax.cluster.ray_env import Cluster, Node
from cputax.records import write_json
from cputax.rundir import RunDir
from cputax.sampling.pyspy_monitor import Discovery, PyspyMonitor, PyspyOptions
from cputax.telemetry.runner import TelemetryConfig, TelemetryMonitor

__all__ = ["NodeAgent", "NodesMonitor"]

CALL_TIMEOUT_S = 120.0
CONVERTED = ("telemetry.jsonl", "pyspy/manifest.jsonl")  # the node files with monotonic times


class NodeAgent:
    """The monitors of one server node (a Ray actor on that node)."""

    def __init__(
        self,
        telemetry: TelemetryConfig,
        pyspy: PyspyOptions | None,
        target: dict[str, Any],
        clock_skew_ns: int = 0,
    ) -> None:
        self.telemetry, self.pyspy, self.target = telemetry, pyspy, target
        self.skew = clock_skew_ns  # tests only: a node whose clock reads this far off
        self.dir = Path(tempfile.mkdtemp(prefix="cputax-node-"))
        self.run = RunDir(self.dir)
        self.monitors: list[Any] = []
        self.sent: dict[str, int] = {}  # file -> bytes already shipped

    def now(self) -> int:
        return time.monotonic_ns() + self.skew

    def start(self) -> list[str]:
        """Start this node's monitors; their notes (what they found, what they could not do)."""
        self.monitors = [TelemetryMonitor(self.telemetry, own_role="agent")]
        if self.pyspy is not None:
            self.monitors.append(PyspyMonitor(self.pyspy.config, self.pyspy.discovery))
        for monitor in self.monitors:
            monitor.start(self.run, self.target)
        return [f"{m.name}: {m.problem}" for m in self.monitors if getattr(m, "problem", None)]

    def scenario_start(self, scenario: str, t_node: int) -> None:
        for monitor in self.monitors:
            monitor.scenario_start(scenario, t_node - self.skew)

    def scenario_end(self, scenario: str, t_node: int) -> dict[str, bytes]:
        for monitor in self.monitors:
            monitor.scenario_end(scenario, t_node - self.skew)
        return self._new_files()

    def stop(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        meta = {}
        for monitor in self.monitors:
            with contextlib.suppress(Exception):
                meta[monitor.name] = monitor.stop()
        files = self._new_files()
        shutil.rmtree(self.dir, ignore_errors=True)
        return meta, files

    def _new_files(self) -> dict[str, bytes]:
        """What the monitors wrote since the last call: new files whole, grown ones from where
        the last call stopped (JSONL files only grow; a line being written waits for the next)."""
        out = {}
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            rel = path.relative_to(self.dir).as_posix()
            data = path.read_bytes()
            if rel.endswith(".jsonl"):
                data = data[: data.rfind(b"\n") + 1]
            done = self.sent.get(rel, 0)
            if len(data) > done:
                out[rel] = self._skewed(rel, data[done:])
                self.sent[rel] = len(data)
        return out

    def _skewed(self, rel: str, data: bytes) -> bytes:
        """A skewed test node's files read its clock too: their monotonic times moved by the
        skew."""
        if not self.skew or rel not in CONVERTED:
            return data
        ahead = NodeClock("", Offset(-self.skew, 0, 0, 0))
        return b"".join(
            orjson.dumps(shift_line(orjson.loads(line), ahead)) + b"\n"
            for line in data.splitlines()
            if line
        )


class NodesMonitor:
    """The driver's side of the node agents (a session.Monitor)."""

    name = "nodes"

    def __init__(
        self,
        cluster: Cluster,
        nodes: list[tuple[Node, int | None]],
        telemetry: TelemetryConfig,
        pyspy: PyspyOptions | None,
        skews: dict[str, int] | None = None,
    ) -> None:
        self.cluster = cluster
        self.nodes = [node for node, _ in nodes]
        self.ports = {
            node.name: port for node, port in nodes
        }  # the server's port there, when not the endpoint's
        self.telemetry, self.pyspy = telemetry, pyspy
        self.skews = skews or {}
        self.agents: dict[str, Any] = {}
        self.clocks: dict[str, NodeClock] = {}
        self.errors: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.run: RunDir | None = None
        self.console = Console(stderr=True)

    def start(self, run: RunDir, target: dict[str, Any]) -> None:
        self.run = run
        ray = self.cluster.ray
        actor = ray.remote(num_cpus=0, max_restarts=0)(NodeAgent)
        server = target.get("server") or (self.pyspy.discovery.server if self.pyspy else "auto")
        # found there as a local run finds its server: the listener on the port, else by
        # process titles
        pyspy = PyspyOptions(self.pyspy.config, Discovery(server)) if self.pyspy else None
        for node in self.nodes:
            node_target = _node_target(target, server, self.ports.get(node.name))
            self.agents[node.name] = actor.options(**self.cluster.on(node)).remote(
                self.telemetry, pyspy, node_target, self.skews.get(node.name, 0)
            )
        for node in self.nodes:
            agent = self._call(node, "start")
            if agent is None:
                continue
            self.notes[node.name] = agent
            self.clocks[node.name] = self._clock(node)
            self.console.print(
                f"node agent on {node.ip}: clock offset "
                f"{self.clocks[node.name].start.offset_ns / 1e6:+.3f} ms "
                f"± {self.clocks[node.name].error_ns / 1e3:.0f} µs"
                + (f"; {'; '.join(agent)}" if agent else "")
            )

    def _clock(self, node: Node) -> NodeClock:
        agent = self.agents[node.name]
        if self.cluster.same_host(node) and not self.skews.get(node.name):
            return NodeClock.of_driver(node.name, time.monotonic_ns())
        ray = self.cluster.ray
        return NodeClock(node.name, measure(lambda: ray.get(agent.now.remote()), time.monotonic_ns))

    def _call(self, node: Node, method: str, *args: Any) -> Any:
        """One agent call; on failure the node is named once and left out from then on."""
        if node.name in self.errors or node.name not in self.agents:
            return None
        try:
            return self.cluster.ray.get(
                getattr(self.agents[node.name], method).remote(*args), timeout=CALL_TIMEOUT_S
            )
        except Exception as exc:  # its node died, or the actor did
            line = str(exc).strip().splitlines()
            self.errors[node.name] = (
                f"{method}: " + (line[-1] if line else type(exc).__name__)[:300]
            )
            self.console.print(
                f"[red]node agent on {node.ip} stopped ({self.errors[node.name]}); its files so "
                "far are kept, the other nodes go on[/]"
            )
            return None

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        for node in self.nodes:
            if node.name in self.clocks:
                self._call(node, "scenario_start", scenario, self.clocks[node.name].to_node(t_ns))

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        for node in self.nodes:
            if node.name in self.clocks:
                self._store(
                    node,
                    self._call(
                        node, "scenario_end", scenario, self.clocks[node.name].to_node(t_ns)
                    ),
                )

    def _store(self, node: Node, files: dict[str, bytes] | None) -> None:
        assert self.run is not None
        for rel, data in (files or {}).items():
            path = self.run.node_dir(node.name) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:
                fh.write(data)

    def stop(self) -> dict[str, Any]:
        assert self.run is not None
        meta: dict[str, Any] = {}
        for node in self.nodes:
            if node.name in self.clocks:
                result = self._call(node, "stop")
                if result is not None:
                    meta[node.name], files = result
                    self._store(node, files)
                with contextlib.suppress(Exception):
                    self.clocks[node.name] = self.clocks[node.name].with_end(
                        self._clock(node).start
                    )
            self._convert(node)
        for agent in self.agents.values():
            with contextlib.suppress(Exception):
                self.cluster.ray.kill(agent)
        return {
            node.name: {
                "ip": node.ip,
                "id": node.id,
                "clock": c.as_dict() if (c := self.clocks.get(node.name)) else None,
                "monitors": meta.get(node.name),
                "notes": self.notes.get(node.name, []),
                "error": self.errors.get(node.name),
            }
            for node in self.nodes
        }

    def _convert(self, node: Node) -> None:
        """The node's monotonic times onto the driver's clock, once; windows.jsonl copied in,
        so the node's folder reads like a run directory of its own (analysis)."""
        assert self.run is not None
        folder = self.run.node_dir(node.name)
        folder.mkdir(parents=True, exist_ok=True)
        clock = self.clocks.get(node.name)
        if clock is not None:
            for rel in CONVERTED:
                path = folder / rel
                if path.exists():
                    lines = [
                        orjson.dumps(shift_line(orjson.loads(line), clock))
                        for line in path.read_bytes().splitlines()
                        if line.strip()
                    ]
                    path.write_bytes(b"".join(line + b"\n" for line in lines))
        write_json(
            folder / "clock.json",
            {
                "converted": clock is not None,
                **(clock.as_dict() if clock else {}),
                "error": self.errors.get(node.name),
            },
        )
        if self.run.windows.exists():
            shutil.copyfile(self.run.windows, folder / "windows.jsonl")


def _port(target: dict[str, Any]) -> int | None:
    from urllib.parse import urlsplit

    endpoint = target.get("endpoint")
    return urlsplit(endpoint).port if endpoint else None


def _node_target(target: dict[str, Any], server: str, port: int | None) -> dict[str, Any]:
    """What a node agent knows of the server: its type and port (the node's own, else the
    endpoint's: listened on there when that node serves it); not the driver's pids, which
    mean nothing there."""
    port = port or _port(target)
    out: dict[str, Any] = {"kind": "node", "server": server}
    if port:
        out["endpoint"] = f"http://127.0.0.1:{port}"
    return out
