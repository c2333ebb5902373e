"""`cputax run` and `cputax report`: drive a server through a profile, then analyse.

A run directory holds everything needed to rebuild the report after a crash:
run.json (what was asked, where), requests.jsonl (one line per finished request,
flushed as it finishes), windows.jsonl (when each scenario ran), metrics/
(Prometheus text before and after each scenario, gauge polls). No secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cputax import __version__
from cputax.analysis.agentic import agentic_summary
from cputax.analysis.decompose import summarize_scenario
from cputax.analysis.server_metrics import parse_metrics, scenario_server_metrics
from cputax.errors import CputaxError
from cputax.monitor import Monitor
from cputax.records import (
    JsonlWriter,
    RequestRecord,
    read_json,
    read_jsonl,
    read_requests,
    write_json,
)
from cputax.report.agentic import agentic_section
from cputax.report.html import write_html_report
from cputax.report.markdown import render_report, summary_table
from cputax.report.profiling import profiling_section
from cputax.report.telemetry import telemetry_section
from cputax.sampling.monitor import PyspyMonitor, PyspyOptions, with_controls
from cputax.telemetry.runner import TelemetryConfig, TelemetryMonitor
from cputax.text.tokenizer import LoadedTokenizer, load_tokenizer
from cputax.workload.profiles import Scenario, load_profile, select
from cputax.workload.prompts import CountFn, ScenarioPrompts, local_counter

DEFAULT_PROFILE = "smoke"
GAUGE_POLL_S = 2.0  # /metrics costs the API server CPU: poll gauges sparingly
PREFLIGHT_TIMEOUT_S = 10.0


@dataclass
class RunOptions:
    endpoint: str | None = None
    model: str | None = None
    profile: Path | None = None
    out: Path | None = None
    tokenizer: str | None = None
    api_key_env: str | None = None
    api: str = "chat"
    timeout_s: float = 600.0
    scenarios: list[str] | None = None
    seed: int = 0
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)  # host always; GPU per telemetry.gpu
    pyspy: PyspyOptions | None = None  # --pyspy: sample the server's processes


# Extra report sections: each reads what its monitor left in the run directory and
# returns markdown (or None when that monitor did not run).
ReportSection = Callable[[Path, dict[str, Any], dict[str, Any]], "str | None"]
REPORT_SECTIONS: list[ReportSection] = [agentic_section, telemetry_section, profiling_section]


def build_monitors(opts: RunOptions) -> list[Monitor]:
    """The monitors this run's options ask for (py-spy sampling, telemetry)."""
    monitors: list[Monitor] = [TelemetryMonitor(opts.telemetry)]
    if opts.pyspy:
        monitors.append(PyspyMonitor(opts.pyspy.config, opts.pyspy.discovery))
    return monitors


def resolve_profile(profile: Path | None) -> Path:
    """A path, or a bare name looked up in ./profiles and in the project's profiles/."""
    if profile is not None and (profile.exists() or profile.suffix or len(profile.parts) > 1):
        return profile
    name = f"{profile or DEFAULT_PROFILE}.toml"
    for root in (Path.cwd() / "profiles", Path(__file__).resolve().parents[2] / "profiles"):
        if (root / name).is_file():
            return root / name
    raise CputaxError(f"profile {name!r} not found in ./profiles; pass --profile PATH")


def _api_key(var: str | None) -> str | None:
    if var is None:
        return None
    key = os.environ.get(var)
    if not key:
        raise CputaxError(f"--api-key-env {var}: that environment variable is not set")
    return key


def _new_run_dir(out: Path | None) -> Path:
    out = out or Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    if (out / "requests.jsonl").exists():
        raise CputaxError(f"{out} already holds a run; choose another --out (nothing was overwritten)")
    (out / "metrics").mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def _target(opts: RunOptions, out: Path) -> Iterator[tuple[str, str | None, dict[str, Any]]]:
    """The endpoint to measure: the user's, or the embedded target started for this run."""
    if opts.endpoint:
        yield opts.endpoint.rstrip("/"), opts.model, {"kind": "external"}
        return
    from cputax.targets.local import LocalServer

    console = Console(stderr=True)
    console.print("[bold]starting the embedded target[/] (transformers serve on this CPU)...")
    with LocalServer(log_path=out / "server.log") as server:
        console.print(f"embedded target up at {server.endpoint} (pid {server.pid})")
        yield server.endpoint, opts.model or server.model, {"kind": "embedded", "pid": server.pid}


def run(opts: RunOptions) -> int:
    profile = resolve_profile(opts.profile)
    scenarios = select(load_profile(profile), opts.scenarios, profile)
    if opts.pyspy and opts.pyspy.overhead:
        scenarios = with_controls(scenarios)  # each scenario also unsampled: py-spy's overhead
    api_key = _api_key(opts.api_key_env)
    tokenizer = load_tokenizer(opts.tokenizer)
    out = _new_run_dir(opts.out)
    Console(stderr=True).print(f"run directory: {out}")
    max_conc = max(s.concurrency if s.arrival == "closed" else max(s.concurrency, s.burst_size or 0) for s in scenarios)
    info = {"profile": str(profile), "scenarios": [asdict(s) for s in scenarios]}

    async def body(conn: Connection) -> None:
        await _scenarios(conn, scenarios, tokenizer, opts)

    drive(opts, api_key, tokenizer, out, info, body, max_connections=max(64, 2 * max_conc))
    return 0


@dataclass
class Connection:
    """An endpoint reached and probed, ready for load: what `run` and `replay` drive."""

    client: Any  # StreamingClient
    endpoint: str
    model: str
    target: dict[str, Any]
    count: CountFn
    counter_name: str
    has_metrics: bool
    ignore_eos: bool
    monitors: list[Monitor]
    out: Path
    console: Console

    @property
    def local_count(self) -> bool:
        return self.counter_name.startswith("local")


def drive(opts: RunOptions, api_key: str | None, tokenizer: LoadedTokenizer, out: Path, info: dict[str, Any],
          body: Callable[[Connection], Awaitable[None]], max_connections: int = 64) -> None:
    """Reach the endpoint (or start the embedded target), probe it, write run.json (what every
    run records, plus `info`), run `body` with the monitors watching, and rebuild the report
    from whatever was written, also after an error or Ctrl-C."""
    try:
        with _target(opts, out) as (endpoint, model, target):
            asyncio.run(_drive(opts, endpoint, model, target, api_key, tokenizer, out, info, body, max_connections))
    finally:
        if (out / "run.json").exists():
            rebuild_report(out)


async def _preflight(client: Any, endpoint: str, model: str | None) -> str:
    """Fail within seconds on an unreachable endpoint; pick the model if not given."""
    try:
        models = await asyncio.wait_for(client.get_json("/v1/models"), PREFLIGHT_TIMEOUT_S)
    except Exception as exc:
        raise CputaxError(
            f"cannot reach {endpoint}/v1/models ({type(exc).__name__}: {exc}); "
            "is the server up and is --endpoint its base URL (e.g. http://127.0.0.1:8000)?"
        ) from exc
    if model:
        return model
    ids = [m.get("id") for m in (models or {}).get("data", []) if isinstance(m, dict)]
    if not ids:
        raise CputaxError(f"{endpoint}/v1/models lists no model; pass --model NAME")
    return ids[0]


async def _server_counter(client: Any, model: str, api: str, tokenizer: LoadedTokenizer) -> tuple[CountFn, str]:
    """The server's /tokenize when it answers (vLLM does), else the local tokenizer."""
    from cputax.text.conversation import render_chat

    try:
        status, body = await client.post_json("/tokenize", {"model": model, "prompt": "hello"})
    except Exception:
        status, body = 0, None
    if status != 200 or not isinstance(body, dict) or "count" not in body:
        return local_counter(tokenizer), f"local ({tokenizer.name})"

    async def count(messages: list[dict], tools: list[dict] | None) -> int:
        if api == "chat":
            req: dict[str, Any] = {"model": model, "messages": messages, "add_generation_prompt": True}
            if tools:
                req["tools"] = tools
        else:
            req = {"model": model, "prompt": render_chat(messages, tools)}
        status, answer = await client.post_json("/tokenize", req)
        if status != 200 or "count" not in answer:
            raise CputaxError(f"/tokenize answered {status}: {str(answer)[:200]}")
        return int(answer["count"])

    return count, "server /tokenize"


async def _accepts_ignore_eos(client: Any, model: str, api: str) -> bool:
    """vLLM and SGLang take `ignore_eos` (fixed output lengths); strict servers answer 400/422."""
    from cputax.records import RequestRecord

    def build() -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": 1, "ignore_eos": True}
        if api == "chat":
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        return body

    record = await client.send(RequestRecord(scenario="probe"), build)
    return record.status not in (400, 422)


async def _scrape(client: Any, has_metrics: bool) -> str | None:
    if not has_metrics:
        return None
    with contextlib.suppress(Exception):
        status, text = await client.get_text("/metrics")
        if status == 200:
            return text
    return None


async def _poll_gauges(client: Any, path: Path, stop: asyncio.Event) -> None:
    with JsonlWriter(path) as writer:
        while not stop.is_set():
            text = await _scrape(client, True)
            if text is not None:
                values = parse_metrics(text)
                writer.write({"t_ns": time.monotonic_ns(), **{k: v for k, v in values.items() if not k.endswith(("_sum", "_count", "_total"))}})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), GAUGE_POLL_S)


def _host_info() -> dict[str, Any]:
    import psutil

    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        cpu_model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    return {"cpu_model": cpu_model, "cpus": psutil.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


async def _drive(opts: RunOptions, endpoint: str, model: str | None, target: dict[str, Any],
                 api_key: str | None, tokenizer: LoadedTokenizer, out: Path, info: dict[str, Any],
                 body: Callable[[Connection], Awaitable[None]], max_connections: int) -> None:
    from cputax.client.stream import StreamingClient

    console = Console(stderr=True)
    async with StreamingClient(endpoint, api=opts.api, api_key=api_key, timeout_s=opts.timeout_s,
                               max_connections=max_connections) as client:
        model = await _preflight(client, endpoint, model)
        count, counter_name = await _server_counter(client, model, opts.api, tokenizer)
        has_metrics = await _scrape(client, True) is not None
        ignore_eos = await _accepts_ignore_eos(client, model, opts.api)
        write_json(out / "run.json", {
            "cputax_version": __version__, "argv": sys.argv[1:], "endpoint": endpoint, "model": model,
            "api": opts.api, "target": target, "tokenizer": tokenizer.source,
            "prompt_counter": counter_name, "server_metrics": has_metrics, "ignore_eos": ignore_eos, "host": _host_info(),
            "clock": {"monotonic_ns": time.monotonic_ns(), "time_ns": time.time_ns()},
            **info,
        })
        console.print(f"model {model}; prompts sized by {counter_name}; server metrics: "
                      f"{'yes' if has_metrics else 'none (server-side columns will be absent)'}; "
                      f"ignore_eos {'sent' if ignore_eos else 'refused by the server: output may stop early'}")
        monitors = build_monitors(opts)
        for monitor in monitors:
            monitor.start(out, {**target, "endpoint": endpoint})
        try:
            await body(Connection(client, endpoint, model, target, count, counter_name, has_metrics,
                                  ignore_eos, monitors, out, console))
        finally:
            meta = {m.name: m.stop() for m in monitors}
            if meta:
                info = read_json(out / "run.json")
                write_json(out / "run.json", {**info, "monitors": meta})


@contextlib.asynccontextmanager
async def measured(conn: Connection, name: str) -> AsyncIterator[None]:
    """One scenario's measured window: /metrics scraped before and after, gauges polled
    between, the monitors told when it starts and ends."""
    metrics = conn.out / "metrics"
    before = await _scrape(conn.client, conn.has_metrics)
    stop = asyncio.Event()
    poller = (asyncio.create_task(_poll_gauges(conn.client, metrics / f"{name}.gauges.jsonl", stop))
              if conn.has_metrics else None)
    for monitor in conn.monitors:
        monitor.scenario_start(name, time.monotonic_ns())
    try:
        yield
    finally:
        for monitor in conn.monitors:
            monitor.scenario_end(name, time.monotonic_ns())
        stop.set()
        if poller:
            await poller
    after = await _scrape(conn.client, conn.has_metrics)
    for label, text in (("before", before), ("after", after)):
        if text is not None:
            (metrics / f"{name}.{label}.prom").write_text(text)


@contextlib.contextmanager
def recording(records: JsonlWriter, name: str, total: int | None,
              console: Console) -> Iterator[Callable[[RequestRecord], None]]:
    """A callback that writes each finished record at once and advances a progress bar."""
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(name, total=total, errors=0)
        errors = 0

        def on_record(record: RequestRecord) -> None:
            nonlocal errors
            records.write(record)
            errors += not record.ok
            progress.update(task, advance=1, errors=errors)

        yield on_record


async def _scenarios(conn: Connection, scenarios: list[Scenario], tokenizer: LoadedTokenizer,
                     opts: RunOptions) -> None:
    with JsonlWriter(conn.out / "requests.jsonl") as records, JsonlWriter(conn.out / "windows.jsonl") as windows:
        for scenario in scenarios:
            prompts = ScenarioPrompts(scenario, tokenizer, conn.model, api=opts.api, run_seed=opts.seed,
                                      ignore_eos=conn.ignore_eos)
            await _one_scenario(conn, prompts, records, windows)


async def _one_scenario(conn: Connection, prompts: ScenarioPrompts, records: JsonlWriter,
                        windows: JsonlWriter) -> None:
    from cputax.client.loadgen import run_scenario, warm_up

    scenario = prompts.scenario
    conn.console.print(f"[bold]{scenario.name}[/]: {scenario.describe()}, {scenario.context_tokens} tokens, "
                       f"max_tokens {scenario.max_tokens}; building prompts...")
    await prompts.prepare(conn.count)
    warm = await warm_up(conn.client, prompts, scenario.warmup)
    for r in warm:
        if not r.ok:
            conn.console.print(f"[yellow]warm-up request failed: {r.error}[/]")
    counted = [r.prompt_tokens for r in warm if r.ok and r.prompt_tokens and r.output_tokens_source == "usage"]
    if conn.local_count and counted:
        prompts.correct(counted[0])  # the server's own count beats our local estimate
    async with measured(conn, scenario.name):
        with recording(records, scenario.name, scenario.planned_requests, conn.console) as on_record:
            window = await run_scenario(conn.client, prompts, on_record, seed=prompts.seed)
    windows.write({"scenario": scenario.name, "start_ns": window.start_ns, "end_ns": window.end_ns,
                   "sent": window.sent, "user_tokens": prompts.user_tokens,
                   "tools": len(prompts.tools or [])})


def _server_side(out: Path, name: str, requests: int) -> dict[str, Any] | None:
    before, after = (out / "metrics" / f"{name}.{w}.prom" for w in ("before", "after"))
    if not (before.exists() and after.exists()):
        return None
    gauges_path = out / "metrics" / f"{name}.gauges.jsonl"
    polls = list(read_jsonl(gauges_path)) if gauges_path.exists() else []
    return scenario_server_metrics(parse_metrics(before.read_text()), parse_metrics(after.read_text()), requests, polls)


def rebuild_report(out: Path) -> int:
    """Rebuild summary.json and report.md from a run directory's files."""
    if not out.is_dir():
        raise CputaxError(f"{out}: no such run directory")
    info = read_json(out / "run.json")
    requests_path = out / "requests.jsonl"
    records = read_requests(requests_path) if requests_path.exists() else []
    windows = {w["scenario"]: w for w in read_jsonl(out / "windows.jsonl")} if (out / "windows.jsonl").exists() else {}
    summaries = []
    for scenario in info["scenarios"]:
        mine = [r for r in records if r.scenario == scenario["name"]]
        if not mine:
            continue
        server = _server_side(out, scenario["name"], sum(r.ok for r in mine))
        summaries.append(summarize_scenario(scenario, mine, windows.get(scenario["name"]), server))
    summary = {"run": {k: info[k] for k in ("endpoint", "model", "profile", "prompt_counter", "host") if k in info},
               "scenarios": summaries}
    if "replay" in info:
        server = (summaries[0].get("server") or {}) if summaries else {}
        summary["agentic"] = agentic_summary(records, info["replay"], server.get("prefix_cache_hit_rate"))
    write_json(out / "summary.json", summary)
    sections = [text for build in REPORT_SECTIONS if (text := build(out, summary, info))]
    markdown = render_report(summary, info, sections)
    (out / "report.md").write_text(markdown)
    html = write_html_report(out, summary, info, markdown)
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file or pipe: don't squeeze the table
    console.print(summary_table(summaries))
    console.print(f"wrote {out / 'summary.json'}, {out / 'report.md'} and {html}")
    return 0
