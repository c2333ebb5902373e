"""Connecting to Ray: a local cluster started for the run (`--ray`), or an existing one
(`--ray auto`, `--ray HOST:PORT`), and the nodes cputax uses on it.

A local cluster listens on loopback only: Ray binds its servers to 127.0.0.1 when its node
address is loopback, which it picks when told clusters are off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, its own switch for single-machine use). Nothing
else is opened beyond loopback unless the user points at a cluster. Secrets never go
into an actor's arguments: the environment variables the run names (the API key's) reach
the actors through Ray's runtime env, and the actors read them there.

Nodes: load shards go to the nodes with the `cputax-client` resource, else to every node;
node agents to the nodes named by --server-nodes (node id or IP), else those with the
`cputax-server` resource.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cputax.errors import CputaxError

__all__ = ["CLIENT_RESOURCE", "LOCAL", "SERVER_RESOURCE", "Cluster", "Node", "RayOptions"]

LOCAL = "local"
CLIENT_RESOURCE = "cputax-client"
SERVER_RESOURCE = "cputax-server"
NAMESPACE = "cputax"


@dataclass
class RayOptions:
    """What `--ray [ADDRESS]` and `--server-nodes` asked for."""

    address: str = LOCAL  # LOCAL: start one for this run; "auto" or HOST:PORT: join that cluster
    server_nodes: list[str] = field(default_factory=list)  # node ids or IPs for the agents
    num_cpus: int | None = None  # a local cluster's CPUs (default: this machine's)
    resources: dict[str, float] = field(default_factory=dict)  # a local cluster's custom resources


@dataclass(frozen=True)
class Node:
    id: str
    ip: str
    resources: dict[str, float]

    @property
    def name(self) -> str:
        """The node's folder name under nodes/: its IP, and the id's head when IPs repeat."""
        return f"{self.ip}-{self.id[:8]}"


class Cluster:
    """The Ray connection for one run (a context manager)."""

    def __init__(self, options: RayOptions, env_vars: tuple[str, ...] = ()) -> None:
        self.options = options
        self.env_vars = tuple(v for v in env_vars if v)
        self.started_local = options.address == LOCAL
        self._ray: Any = None

    def __enter__(self) -> Cluster:
        if self.started_local:
            # before Ray is imported: it reads the switch once, at import
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only, see above
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError as exc:
            raise CputaxError("--ray needs Ray: pip install 'cputax[ray]'") from exc
        self._ray = ray
        env = {name: os.environ[name] for name in self.env_vars if name in os.environ}
        runtime_env = {"env_vars": env} if env else None
        kwargs: dict[str, Any] = {
            "namespace": NAMESPACE,
            "log_to_driver": False,
            "runtime_env": runtime_env,
            "configure_logging": False,
        }
        if self.started_local:
            kwargs.update(
                num_cpus=self.options.num_cpus or os.cpu_count(),
                include_dashboard=False,
                resources=self.options.resources or None,
            )
        else:
            kwargs["address"] = self.options.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CputaxError(
                f"--ray {self.options.address}: cannot connect to the Ray cluster ({exc})"
            ) from exc
        if self.started_local and any(n.ip != "127.0.0.1" for n in self.nodes()):
            ray.shutdown()
            raise CputaxError(
                "the local Ray cluster would listen beyond loopback (Ray was imported before "
                "cputax could tell it not to); start cputax in a fresh process"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    @property
    def ray(self) -> Any:
        return self._ray

    def address(self) -> str:
        return "a local cluster on loopback" if self.started_local else self.options.address

    def nodes(self) -> list[Node]:
        return [
            Node(n["NodeID"], n.get("NodeManagerAddress", "?"), dict(n.get("Resources") or {}))
            for n in self._ray.nodes()
            if n.get("Alive")
        ]

    def client_nodes(self) -> list[Node]:
        nodes = self.nodes()
        return [n for n in nodes if n.resources.get(CLIENT_RESOURCE)] or nodes

    def server_nodes(self) -> list[tuple[Node, int | None]]:
        """The nodes for agents, each with the server's port there when --server-nodes named
        one (NODE:PORT), else None (the endpoint's port)."""
        nodes = self.nodes()
        if not self.options.server_nodes:
            return [(n, None) for n in nodes if n.resources.get(SERVER_RESOURCE)]
        found: list[tuple[Node, int | None]] = []
        for entry in self.options.server_nodes:
            wanted, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
            match = [n for n in nodes if wanted in (n.id, n.ip) or n.id.startswith(wanted)]
            if not match or (port and not port.isdigit()):
                known = ", ".join(f"{n.ip} ({n.id[:8]})" for n in nodes)
                raise CputaxError(
                    f"--server-nodes {entry}: no such live node in the Ray cluster "
                    f"(nodes: {known}); "
                    "give a node's IP or id, optionally :PORT"
                )
            found += [
                (n, int(port) if port else None) for n in match if all(n is not f for f, _ in found)
            ]
        return found

    def driver_node_id(self) -> str:
        return self._ray.get_runtime_context().get_node_id()

    def same_host(self, node: Node) -> bool:
        """Whether `node` is the driver's machine (one kernel, one monotonic clock): its IP is
        the driver's node's (two machines of one cluster never share one)."""
        mine = next((n for n in self.nodes() if n.id == self.driver_node_id()), None)
        return mine is not None and node.ip == mine.ip

    def on(self, node: Node) -> dict[str, Any]:
        """Actor options that pin it to `node`."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.id, soft=False)}
