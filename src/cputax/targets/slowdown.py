"""The measuring side of the slowdown plugin (cputax.emulation.slowdown): the control file
the server's processes read, their totals read back, and the check that every function a
component names exists in the installed server.

The plugin reads `control.json` at start-up (which functions to wrap, in which process) and
again whenever it changes (the slowdown of each component, and an epoch); each process
writes its totals to `stats/<pid>.json` every PERIOD_S with the epoch it has applied.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cputax.errors import CputaxError
from cputax.servers import Component, ServerTable

__all__ = [
    "ENV",
    "PERIOD_S",
    "SlowdownControl",
    "SlowdownMonitor",
    "check_functions",
    "missing_function",
]

ENV = "CPUTAX_SLOWDOWN"  # the plugin's switch: the control file's path
PERIOD_S = 0.05
FIELDS = ("calls", "own_ns", "added_ns", "target_ns")


def _defines(tree: ast.Module, qual: str) -> bool:
    """Whether the module's source defines (or assigns) `qual` ("Class.method" or "name")."""
    body: list[ast.stmt] = tree.body
    parts = qual.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        found = None
        for node in body:
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                and node.name == part
            ):
                found = node
            elif last and isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        if not last:
            if not isinstance(found, ast.ClassDef):
                return False
            body = found.body
    return True


def missing_function(target: str) -> str | None:
    """Why "module:Qual.name" is not in the installed code (None: it is), read from the
    source without importing it (importing vLLM takes seconds). An inherited method (a
    pydantic model's model_dump_json) counts when the module imports its class."""
    module, _, qual = target.partition(":")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:
        return f"{module}: {exc}"
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return f"module {module} not found"
    tree = ast.parse(Path(spec.origin).read_text())
    if _defines(tree, qual):
        return None
    head, _, attr = qual.rpartition(".")
    if head and attr.startswith("model_") and _defines(tree, head):
        return None  # pydantic's own methods, inherited by the model class
    return f"{qual} not defined in {spec.origin}"


def check_functions(table: ServerTable, names: list[str]) -> None:
    """Fail with one line per problem when a component is unknown or one of its functions is
    missing from the installed server (a vLLM version whose code moved)."""
    unknown = [n for n in names if n not in table.components]
    if unknown:
        raise CputaxError(
            f"unknown component {', '.join(unknown)} for {table.name}; "
            f"known: {', '.join(table.components)}"
        )
    problems = [
        f"{name}: {why}"
        for name in names
        for f in table.components[name].functions
        if (why := missing_function(f.target)) is not None
    ]
    if problems:
        raise CputaxError(
            f"the installed {table.name} lacks what these components are made of "
            f"(servers/{table.name}.py names them): " + "; ".join(problems)
        )


def _component_functions(components: list[Component]) -> list[dict[str, str]]:
    return [
        {"component": c.name, "target": f.target, "process": f.process, "gil": f.gil}
        for c in components
        for f in c.functions
    ]


@dataclass
class SlowdownControl:
    """The control file and the stats folder of one experiment (in its directory)."""

    root: Path
    table: ServerTable
    components: list[Component]
    epoch: int = 0
    slowdowns: dict[str, float] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.root / "control.json"

    @property
    def stats_dir(self) -> Path:
        return self.root / "stats"

    def env(self) -> dict[str, str]:
        """What the server's environment needs for the plugin to act."""
        return {ENV: str(self.path.resolve())}

    def write(self, slowdowns: dict[str, float]) -> None:
        """Ask for these slowdowns (component -> k); the processes apply them within PERIOD_S."""
        self.epoch += 1
        self.slowdowns = dict(slowdowns)
        self.root.mkdir(parents=True, exist_ok=True)
        self.stats_dir.mkdir(exist_ok=True)
        data = {
            "functions": _component_functions(self.components),
            "roles": [list(r) for r in self.table.processes],
            "stats_dir": str(self.stats_dir.resolve()),
            "period_s": PERIOD_S,
            "epoch": self.epoch,
            "slowdowns": self.slowdowns,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.path)

    def _live(self, since_ns: int) -> list[dict[str, Any]]:
        out = []
        for path in self.stats_dir.glob("*.json"):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if data.get("written_ns", 0) >= since_ns:
                out.append(data)
        return out

    def processes(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The server processes running the plugin now, once each has applied this epoch
        and written after this call; fails clearly when a component's process has none."""
        start = time.monotonic_ns()
        deadline = time.monotonic() + timeout_s
        while True:
            live = self._live(start)
            applied = [p for p in live if p.get("epoch") == self.epoch]
            roles = {p["role"] for p in applied}
            wanted = {f.process for c in self.components for f in c.functions}
            if live and len(applied) == len(live) and wanted <= roles:
                break
            if time.monotonic() > deadline:
                seen = ", ".join(sorted(p["role"] for p in live)) or "none"
                raise CputaxError(
                    "the slowdown plugin did not answer in "
                    f"{', '.join(sorted(wanted - roles)) or 'time'} "
                    f"(processes seen: {seen}); is cputax installed where the server runs "
                    f"(entry point cputax_slowdown in vllm.general_plugins)?"
                )
            time.sleep(PERIOD_S / 2)
        missing = [m for p in applied for m in p.get("missing", [])]
        if missing:
            raise CputaxError("the slowdown plugin could not wrap: " + "; ".join(missing))
        return applied

    def totals(self) -> dict[str, dict[str, int]]:
        """Each component's totals so far, summed over the processes (written after this call)."""
        out: dict[str, dict[str, int]] = {}
        for proc in self.processes():
            for name, values in proc["components"].items():
                mine = out.setdefault(name, dict.fromkeys(FIELDS, 0))
                for key in FIELDS:
                    mine[key] += values[key]
        return out


def _delta(
    after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    return {
        name: {k: v - before.get(name, {}).get(k, 0) for k, v in values.items()}
        for name, values in after.items()
    }


class SlowdownMonitor:
    """A run's monitor (session.Monitor): each component's totals over each scenario's window."""

    name = "slowdown"

    def __init__(self, control: SlowdownControl) -> None:
        self.control = control
        self._before: dict[str, dict[str, dict[str, int]]] = {}
        self.windows: dict[str, dict[str, dict[str, int]]] = {}

    def start(self, run: Any, target: dict[str, Any]) -> None:
        self.control.processes()

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        self._before[scenario] = self.control.totals()

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        self.windows[scenario] = _delta(self.control.totals(), self._before.pop(scenario, {}))

    def stop(self) -> dict[str, Any]:
        return {
            "epoch": self.control.epoch,
            "slowdowns": self.control.slowdowns,
            "windows": self.windows,
        }
