"""Finding the server's processes: the embedded target's pid, the local listener of an endpoint,
or (for py-spy) every process of a server type, matched on /proc/PID/cmdline.

Two shapes seen live on vLLM decide the rules here:
- servers are often started under a wrapper (`timeout`, tini, `bash -c`, `uv run`,
  supervisors) whose cmdline also names the server: only Python processes are the
  server's, a wrapper is walked through, never sampled;
- with `--api-server-count N`, a launcher process has children VLLM::APIServer_0..N-1
  (all listening on the port), VLLM::EngineCore and under it VLLM::Worker: from any
  listener, walk up to the launcher and take its whole tree.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from cputax.errors import CputaxError
from cputax.servers import SERVERS, ServerTable, get, role_in
from cputax.util import redact


def is_local_host(host: str) -> bool:
    """The host is this machine: loopback, a wildcard, or one of its own addresses."""
    if host in ("localhost", "0.0.0.0", "::"):
        return True
    with contextlib.suppress(OSError, ValueError):
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        own = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
        return any(ipaddress.ip_address(a).is_loopback or a in own for a in addresses)
    return False


def listener_pids(port: int) -> list[int]:
    """Processes listening on a TCP port (several with SO_REUSEPORT); those we may not see
    are left out."""
    with contextlib.suppress(psutil.Error, OSError):
        return sorted(
            {
                c.pid
                for c in psutil.net_connections(kind="tcp")
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
            }
        )
    return []


def server_pids(target: dict[str, Any]) -> list[int]:
    """The server's root processes: the embedded target's pid, or the top of the server tree
    above whoever listens on the endpoint's port when the endpoint is on this host. Empty
    when unknown (remote server)."""
    if target.get("pid"):
        return [int(target["pid"])]
    endpoint = target.get("endpoint")
    if not endpoint:
        return []
    url = urlsplit(endpoint)
    if not url.hostname or not is_local_host(url.hostname):
        return []
    port = url.port or (443 if url.scheme == "https" else 80)
    return server_roots(listener_pids(port))


def server_command(target: dict[str, Any]) -> list[str] | None:
    """The command line of the server's root process on this host (credentials hidden)."""
    for pid in server_pids(target):
        with contextlib.suppress(psutil.Error):
            return redact(psutil.Process(pid).cmdline(), keep=64)
    return None


# --- a server's processes by type, pid or port (py-spy sampling) ------------------------------
# Children no server work runs in: left out of sampling.
IGNORED_CMDLINES = re.compile(
    r"multiprocessing\.(resource_tracker|semaphore_tracker|forkserver)|"
    r"torch\._inductor\.compile_worker"
)


@dataclass(frozen=True)
class ServerProcess:
    pid: int
    role: str  # from the server's table ("engine_core"...), else "process" (a root) or "child"
    cmdline: str


def cmdline(pid: int) -> str | None:
    """/proc/PID/cmdline with NULs as spaces (setproctitle titles included), None if gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def _is_python(pid: int) -> bool:
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return True  # unreadable: let py-spy decide
    return "python" in exe or "pypy" in exe


def _descendants(pid: int) -> list[int]:
    with contextlib.suppress(psutil.Error):
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return []


def _ppid(pid: int) -> int | None:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).ppid()
    return None


def _known(pid: int, tables: list[ServerTable]) -> bool:
    """A Python process whose cmdline one of the tables knows: part of a server, not a wrapper."""
    cmd = cmdline(pid)
    return bool(cmd) and _is_python(pid) and any(role_in(cmd, t) for t in tables)


def server_roots(pids: list[int], tables: list[ServerTable] | None = None) -> list[int]:
    """For each pid, the top of its server's own process tree: walk up through parents that
    are server processes themselves (vLLM's launcher above its API servers); a wrapper or the
    shell stops the walk. Each root once, in order."""
    tables = tables if tables is not None else list(SERVERS.values())
    roots = []
    for pid in pids:
        current = pid
        while (parent := _ppid(current)) and parent > 1 and _known(parent, tables):
            current = parent
        roots.append(current)
    return list(dict.fromkeys(roots))


def _by_title(tables: list[ServerTable]) -> list[int]:
    """Root processes whose cmdline a table knows (their children come with them); wrappers
    whose cmdline names the server are passed over for the Python process they run."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = {pid for pid in psutil.pids() if pid not in mine and _known(pid, tables)}
    return sorted(pid for pid in found if _ppid(pid) not in found)


def find_server(
    server: str = "auto",
    pid: int | None = None,
    port: int | None = None,
    roots: list[int] | None = None,
) -> tuple[str | None, list[ServerProcess]]:
    """The server's type and processes: `pid`, the listener on `port`, `roots`, or (none of
    them) every process whose cmdline matches the server's titles; each with all its
    descendants. The type is `server`, else the first table that knows a process's title,
    else None (the attribution then recognises the server from its stacks)."""
    tables = list(SERVERS.values()) if server == "auto" else [get(server)]
    if pid is not None:
        if not psutil.pid_exists(pid):
            raise CputaxError(f"--pid {pid}: no such process")
        roots = [pid]
    elif port is not None:
        roots = server_roots(listener_pids(port), tables)
        if not roots:
            raise CputaxError(
                f"--port {port}: no process on this host listens there "
                "(or it belongs to another user: run as root)"
            )
    elif not roots:
        roots = _by_title(tables)
        if not roots:
            names = " or ".join(t.name for t in tables)
            raise CputaxError(
                f"no {names} server process found on this host (matched against "
                "/proc/PID/cmdline); pass --pid PID or --port PORT"
            )
    pids = list(dict.fromkeys(p for root in roots for p in (root, *_descendants(root))))
    cmds = {p: c for p in pids if (c := cmdline(p)) is not None}
    table = next((t for t in tables if any(role_in(c, t) for c in cmds.values())), None)
    if table is None and server != "auto":
        table = tables[0]
    found = []
    for p, cmd in cmds.items():
        if IGNORED_CMDLINES.search(cmd) or not _is_python(p):
            # a tracker, a compile worker, or a wrapper (timeout, tini, bash -c): not the server
            continue
        role = role_in(cmd, table) if table else None
        found.append(ServerProcess(p, role or ("process" if p in roots else "child"), cmd))
    return (table.name if table else None), _launchers(found, table)


def _launchers(found: list[ServerProcess], table: ServerTable | None) -> list[ServerProcess]:
    """A front-end process with front ends below it is their launcher (vLLM's `vllm serve`
    with --api-server-count > 1): it serves no requests itself."""
    if table is None or not table.front_end_roles:
        return found
    front = {p.pid for p in found if p.role in table.front_end_roles}
    above: set[int] = set()
    for pid in front:
        current = pid
        while (parent := _ppid(current)) and parent > 1:
            if parent in front:
                above.add(parent)
            current = parent
    return [ServerProcess(p.pid, "launcher", p.cmdline) if p.pid in above else p for p in found]
