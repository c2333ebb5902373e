"""An embedded target: a real server started by cputax on this machine, from its table's
launch recipe (cputax.servers: vllm, transformers), with the tiny model (targets.model).

Why it exists: a real OpenAI-compatible server that anyone can start without a GPU, a
download or a hub account, so `cputax run` has something honest to measure. The server
runs as a child in its own process group; `__exit__` stops the whole group, and the
server also gets SIGTERM if cputax dies first (Linux).
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from cputax.emulation.plugin import EMULATE_ENV
from cputax.emulation.steps import LOG_ENV
from cputax.emulation.timing import TimingModel
from cputax.errors import CputaxError
from cputax.servers import Launch, ServerTable
from cputax.targets.model import default_cache_dir, ensure_emulated_model, ensure_model
from cputax.util import client_host, die_with_parent, free_port, port_is_free, url_host

__all__ = ["EmbeddedServer", "command_table", "server_help"]

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"
# The first request may start a batching worker or compile kernels: done at start-up.
WARMUP_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 25
LAYOUT_ENV = "CPUTAX_EMULATED_GPU_LAYOUT"  # uni (default) or mp: see servers/vllm.py
DEFAULT_LAYOUT = "uni"
POLL_S = 0.25


class EmbeddedServer:
    """A server of `table` on the CPU as a context manager: started, warmed up, stopped.

    `__enter__` returns once the server answers its ready path and one tiny completion
    has run; `progress(seconds_waited)` is called while it starts. `extra_args` go on
    the server's command line after cputax's own flags. `emulation`: serve cputax's
    emulated GPU with that timing model (cputax.emulation), its steps appended to
    `steps_path`.
    """

    def __init__(
        self,
        table: ServerTable,
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: Path | None = None,
        cache_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
        progress: Callable[[float], None] | None = None,
        extra_env: Mapping[str, str] | None = None,
        emulation: TimingModel | None = None,
        steps_path: Path | None = None,
    ) -> None:
        if table.launch is None:
            raise CputaxError(
                f"cputax cannot start {table.name} itself; start it and pass --endpoint"
            )
        if emulation is not None and table.launch.emulation_flags is None:
            raise CputaxError(
                f"the embedded {table.name} target cannot host the emulated GPU: "
                "use the vllm target or --emulate-gpu none"
            )
        self.table = table
        self.launch = table.launch
        self.host = host
        self.port = port
        self.log_path = log_path
        self.cache_dir = cache_dir
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(extra_env or {})  # e.g. the span exporter's protocol (session._spans)
        self.progress = progress
        self.emulation = emulation
        self.steps_path = steps_path
        # the emulated GPU's executor layout (servers.vllm.EMULATED_LAYOUTS)
        self.layout = os.environ.get(LAYOUT_ENV, DEFAULT_LAYOUT) if emulation is not None else None
        self.model = ""
        self.model_dir: Path | None = None
        self.command: list[str] = []
        self.startup_s = 0.0
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def endpoint(self) -> str:
        """Base URL without /v1, as `cputax run --endpoint` takes it."""
        return f"http://{url_host(client_host(self.host))}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def check_installed(self) -> None:
        """A CputaxError naming the fix when what the server needs is not importable."""
        missing = [m for m in self.launch.modules if importlib.util.find_spec(m) is None]
        if missing:
            raise CputaxError(
                f"the embedded {self.name} target needs {', '.join(missing)}: "
                f"{self.launch.install_hint}"
            )

    def __enter__(self) -> EmbeddedServer:
        self.check_installed()
        # A busy port must fail here: the ready check would otherwise find the other server.
        if self.port is None and self.table.fixed_port is not None:
            self.port = self.table.fixed_port
        if self.port is None:
            self.port = free_port(self.host)
        elif not port_is_free(self.host, self.port):
            raise CputaxError(
                f"port {self.port} on {self.host} is in use: "
                "stop what holds it or pick another port"
            )
        env = dict(self.launch.env)
        extra = self.extra_args
        if self.emulation is not None and self.launch.emulation_flags is not None:
            self.model_dir = ensure_emulated_model(self.cache_dir)
            extra = (*self.launch.emulation_flags(self.emulation.kv_blocks()), *extra)
            if self.launch.emulation_env is not None:
                try:
                    env.update(self.launch.emulation_env(self.layout or DEFAULT_LAYOUT))
                except KeyError:
                    raise CputaxError(
                        f"{LAYOUT_ENV}={self.layout}: the layouts are uni (the default) and mp"
                    ) from None
            env[EMULATE_ENV] = self.emulation.to_env()
            if self.steps_path is not None:
                env[LOG_ENV] = str(self.steps_path)
        else:
            self.model_dir = ensure_model(self.cache_dir) if self.launch.needs_model else None
        if self.log_path is None:
            self.log_path = (
                (self.cache_dir or default_cache_dir()) / "logs" / f"{self.name}-{self.port}.log"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.command = self.launch.command(self.model_dir or Path(), self.host, self.port, extra)
        started = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            # A process group of its own (stopped as one), in cputax's session: a new session
            # (setsid) is a new autogroup, and the kernel shares the CPUs between autogroups
            # by their recent load, so the mostly idle client waited up to 160 ms for a CPU
            # inside one send() while the server's group spun (docs/invariants.md).
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**_without_emulation(os.environ), **env, **self.extra_env},
                process_group=0,
                preexec_fn=_server_child,
            )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after the grace period; idempotent."""
        proc = self._proc
        if proc is None or self._stopped:
            return
        for sig, wait_s in ((signal.SIGTERM, self.launch.stop_grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # process_group=0: the group id is the server's pid
            except ProcessLookupError:
                break  # the whole group is gone
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                continue
            if not _group_alive(proc.pid):
                break
        proc.wait()
        self._stopped = True  # the pid may be reused from now on: never signal it again

    def wait(self) -> int:
        """Block until the server exits; its exit status."""
        if self._proc is None:
            raise CputaxError(f"the embedded {self.name} server was not started")
        return self._proc.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def failure(self, what: str) -> CputaxError:
        return CputaxError(
            f"{self.name} {what} (log {self.log_path}); last lines:\n{self.log_tail()}"
        )

    def _request(
        self, method: str, path: str, body: dict | None = None, timeout: float = 5.0
    ) -> tuple[int, dict]:
        conn = http.client.HTTPConnection(client_host(self.host), self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=payload, headers={"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data or b"{}")
        except ValueError:
            return resp.status, {"raw": data.decode(errors="replace")}

    def _wait_ready(self, started: float) -> None:
        """The ready path first (the model loads before the server listens), then one tiny
        completion."""
        assert self._proc is not None
        deadline = started + self.launch.ready_timeout_s
        next_report = started + 5.0
        while True:
            if self._proc.poll() is not None:
                raise self.failure(f"exited with status {self._proc.returncode} while starting")
            try:
                if self._request("GET", self.launch.ready_path, timeout=2.0)[0] == 200:
                    break
            except OSError:
                pass
            now = time.monotonic()
            if now > deadline:
                raise self.failure(
                    f"did not answer {self.launch.ready_path} "
                    f"within {self.launch.ready_timeout_s:.0f} s"
                )
            if self.progress and now >= next_report:
                self.progress(now - started)
                next_report = now + 5.0
            time.sleep(POLL_S)
        self.model = self.launch.model_name or self._listed_model()
        self._first_completion()

    def _listed_model(self) -> str:
        status, models = self._request("GET", MODELS_PATH)
        names = [m.get("id") for m in models.get("data", [])] if status == 200 else []
        if names:
            return names[0]
        if not self.table.capabilities.lists_models and self.model_dir is not None:
            return str(self.model_dir)  # served under the folder's path
        raise self.failure(f"listed no model at {MODELS_PATH} (HTTP {status})")

    def _first_completion(self) -> None:
        probe = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Ready?"}],
            "max_tokens": 2,
        }
        result: list[tuple[int, dict]] = []
        errors: list[OSError] = []

        def ask() -> None:
            try:
                result.append(self._request("POST", CHAT_PATH, probe, timeout=WARMUP_TIMEOUT_S))
            except OSError as exc:
                errors.append(exc)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        while asker.is_alive():
            asker.join(POLL_S)
            if self._proc is not None and self._proc.poll() is not None:
                raise self.failure(
                    f"exited with status {self._proc.returncode} on its first completion"
                )
        if errors:
            raise self.failure(f"did not answer its first completion ({errors[0]})") from errors[0]
        status, answer = result[0]
        if status != 200 or answer.get("usage", {}).get("completion_tokens") != 2:
            raise self.failure(
                f"failed its first completion (HTTP {status}: {json.dumps(answer)[:300]})"
            )


# The embedded server shares this machine's CPUs with the measuring client: a little lower
# priority, so that a client woken by a token gets a CPU first (its stamps are the
# measurement) and the server takes the rest, as on a machine where the client has its own
# core. Measured on 2 cores: docs/invariants.md.
SERVER_NICE = 5


def _server_child() -> None:
    """In the server's process before exec: die with cputax, and yield the CPU to the client."""
    die_with_parent()
    os.nice(SERVER_NICE)


def command_table(table: ServerTable, template: str) -> ServerTable:
    """`table` with the user's own command as its launch recipe (`cputax sweep --serve-cmd`):
    `{args}` becomes the configuration's flags and `{port}` a free port (or the command's
    own `--port N`); the server's type, rules and metrics stay the table's."""
    if "{args}" not in template:
        raise CputaxError(
            "--serve-cmd must contain {args}, where each configuration's flags go, e.g. "
            "'vllm serve MODEL --port {port} {args}'"
        )
    fixed = re.search(r"--port[= ](\d+)", template)
    if "{port}" not in template and fixed is None:
        raise CputaxError("--serve-cmd must contain {port} (cputax picks a free one) or --port N")

    def command(model_dir: Path, host: str, port: int, extra: tuple[str, ...]) -> list[str]:
        text = (
            template.replace("{args}", shlex.join(extra))
            .replace("{port}", str(port))
            .replace("{host}", host)
        )
        return shlex.split(text)

    base = table.launch
    launch = Launch(
        command=command,
        env={"PYTHONUNBUFFERED": "1"},
        modules=(),
        install_hint="",
        description=f"your command: {template}",
        ready_path="/v1/models",
        ready_timeout_s=base.ready_timeout_s if base else 600.0,
        stop_grace_s=base.stop_grace_s if base else 20.0,
        needs_model=False,
    )
    return dataclasses.replace(table, launch=launch, fixed_port=int(fixed[1]) if fixed else None)


HELP_TIMEOUT_S = 300.0


def server_help(table: ServerTable) -> str:
    """What the server's own --help prints (every flag it takes), for checking a sweep's knobs
    before any server starts; a CputaxError when it cannot be had."""
    launch = table.launch
    if launch is None or launch.help_command is None:
        raise CputaxError(f"cputax cannot ask {table.name} for its flags")
    missing = [m for m in launch.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise CputaxError(
            f"the embedded {table.name} target needs {', '.join(missing)}: {launch.install_hint}"
        )
    try:
        proc = subprocess.run(
            launch.help_command(),
            capture_output=True,
            text=True,
            timeout=HELP_TIMEOUT_S,
            env={**os.environ, **launch.env},
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CputaxError(f"{table.name} --help failed: {exc}") from exc
    if proc.returncode != 0 or "--" not in proc.stdout:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CputaxError(f"{table.name} --help exited with {proc.returncode}: {' / '.join(tail)}")
    return proc.stdout


def _without_emulation(environ: Mapping[str, str]) -> dict[str, str]:
    """cputax's own environment, less any emulation request it inherited: the plugin
    serves the emulated GPU only where this server was asked to."""
    return {k: v for k, v in environ.items() if k not in (EMULATE_ENV, LOG_ENV)}


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
