"""The shape of what cputax knows about one server type, as data.

A `ServerTable` holds, for one server (vLLM, SGLang, `transformers serve`, the stub):
- process titles (matched on /proc/PID/cmdline) and what each thread does;
- the frame -> category rules py-spy samples are classified by (see `Rule`);
- the names of its Prometheus metrics, per quantity cputax reads;
- what it offers a measuring client (`Capabilities`);
- how cputax starts it as an embedded target, where it can (`Launch`).

Adding a server means one new module in this package with one such table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# Where a server's CPU time goes. The order is the report's column order.
CATEGORIES = (
    "http",
    "chat_template",
    "tokenize",
    "preprocess",
    "ipc",
    "schedule",
    "kv_cache",
    "prefix_hash",
    "model_execute",
    "gpu_wait",
    "worker_wait",
    "step_wait",
    "sample",
    "output_process",
    "detokenize",
    "sse",
    "metrics",
    "metrics_scrape",
    "kv_connector",
    "gc",
    "idle",
    "other",
)
IDLE = "idle"
OTHER = "other"

# One plain sentence per category: what the report prints beside the numbers.
MEANINGS = {
    "http": "HTTP parsing, routing, request validation, middleware",
    "chat_template": "rendering the chat template (Jinja)",
    "tokenize": "tokenizing the prompt",
    "preprocess": "turning a request into an engine request (input processing, validation)",
    "ipc": (
        "moving requests and outputs between processes (serialization, sockets, shared "
        "memory copies)"
    ),
    "schedule": "choosing the next batch, request bookkeeping, the engine loop's own glue",
    "kv_cache": "allocating and managing KV-cache blocks",
    "prefix_hash": "hashing prompt blocks for prefix caching",
    "model_execute": (
        "preparing inputs and running the forward pass, as Python sees it (on a GPU: "
        "launching kernels)"
    ),
    "gpu_wait": "the CPU waiting for the GPU: synchronize, copying results back",
    "worker_wait": (
        "the engine loop waiting for its workers' model step; vLLM waits by spinning on "
        "shared memory (sched_yield), so this is CPU busy, not idle"
    ),
    "step_wait": (
        "a worker waiting for the engine's next step; vLLM spins here too for a second "
        "after each step: CPU busy while the model (the GPU) has nothing to do"
    ),
    "sample": "logits processing and sampling",
    "output_process": "turning engine outputs into per-request outputs",
    "detokenize": "incremental detokenization",
    "sse": "building and writing the stream's chunks, tool and reasoning parsers",
    "metrics": "the server's own request instrumentation (Prometheus middleware, stat loggers)",
    "metrics_scrape": "answering GET /metrics (cputax's own scrapes and gauge polls)",
    "kv_connector": "KV transfer and offload connectors (LMCache, disaggregation)",
    "gc": "the garbage collector (visible only with --pyspy-native)",
    "idle": (
        "waiting: the innermost Python frame is a known wait (select, a queue or condition "
        "wait, a zmq poll)"
    ),
    "other": (
        "no rule matched; the report lists these stacks' innermost frames so the table can "
        "be extended"
    ),
}
# Categories that are waits for another part of the server rather than work of their own.
WAITS = ("gpu_wait", "worker_wait", "step_wait")


@dataclass(frozen=True)
class Rule:
    """Frames of `path` (glob) and `func` (glob on py-spy's function name) are `category`.

    `leaf`: only when the frame is the innermost one (a wait: the thread is blocked
    there, not in something it called). `within`: only below a frame matching
    (path, func): the same wait means something else inside that caller.
    """

    category: str
    path: str = "*"
    func: str = "*"
    leaf: bool = False
    within: tuple[str, str] | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r} in {self}")


@dataclass(frozen=True)
class MetricNames:
    """Prometheus names per quantity cputax reads; the first name a scrape has wins."""

    histograms: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict
    )  # queue, prefill, ttft, ...
    counters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # prefix_cache_hits, ...
    gauges: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # running, waiting, ...


@dataclass(frozen=True)
class Tracing:
    """How the server gives its own account of each request (analysis.server_phases).

    Spans: `traces_flag URL` (+ `env`) makes the server post one span named `span_name`
    per finished request to an OTLP/HTTP receiver; `attributes` maps cputax's names to
    the span's attributes (seconds; the tokens as counts). The request's arrival is the
    span's start (wall clock). Its parent comes from a W3C `traceparent` header, its
    request id from `X-Request-Id` (`request_id_attribute`, with the server's prefix).
    Response: with `metrics_flag`, the final usage chunk carries `metrics_field`, whose
    fields `response_fields` maps (milliseconds).
    """

    traces_flag: str
    env: Mapping[str, str]
    span_name: str
    attributes: Mapping[str, str]
    request_id_attribute: str
    metrics_flag: str | None = None
    metrics_field: str = "metrics"
    response_fields: Mapping[str, str] = field(default_factory=dict)
    # exporter batching (OTEL_BSP_SCHEDULE_DELAY, ms): spans arrive up to this late
    export_delay_ms: int = 5000


@dataclass(frozen=True)
class Capabilities:
    """What the server offers a measuring client, as found on the real server."""

    metrics_path: str | None = "/metrics"  # Prometheus text; None: none
    tokenize_path: str | None = None  # the server's own token count of a prompt
    version_path: str | None = None
    ignore_eos: bool = True  # takes the `ignore_eos` field (fixed output lengths)
    # `tools` without `tool_choice` means "auto"; a server started without a tool parser may
    # refuse it. cputax probes once and falls back to tool_choice "none" (tools still rendered).
    auto_tool_choice: bool = True
    lists_models: bool = True  # /v1/models lists the served model
    usage_in_stream: str = (
        "on_request"  # "on_request" (stream_options.include_usage) or "final" (always)
    )
    role_chunk: str = "with_first_token"  # "with_first_token" (vLLM) or "at_headers"
    tracing: Tracing | None = None  # per-request spans / metrics; None: the server has neither


@dataclass(frozen=True)
class Launch:
    """How cputax starts the server as an embedded target on this machine.

    `command(model_dir, host, port, extra_args)` is the argv; `env` is added to the
    environment. Ready when `ready_path` answers 200, then one tiny completion runs.
    """

    command: Callable[[Path, str, int, tuple[str, ...]], list[str]]
    env: Mapping[str, str]
    modules: tuple[str, ...]  # what must be importable (the [local] extra)
    install_hint: str
    description: str  # one line for progress output: what is starting
    ready_path: str = "/v1/models"
    ready_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    model_name: str | None = None  # the served model's name; None: whatever /v1/models lists
    model_dtype: str = "float32"  # the embedded model's weights
    needs_model: bool = True  # False for a user's own command (`cputax sweep --serve-cmd`)
    # argv that prints the server's flags (`vllm serve --help=all`): what a sweep may vary
    help_command: Callable[[], list[str]] | None = None
    # the flags that serve cputax's emulated GPU (cputax.emulation), given its KV blocks
    # (None: no limit modelled); None where the server cannot host it
    emulation_flags: Callable[[int | None], tuple[str, ...]] | None = None
    # the environment that serves it, given the executor layout asked for; None: unchanged
    emulation_env: Callable[[str], Mapping[str, str]] | None = None


@dataclass(frozen=True)
class Preset:
    """A named server knob for `cputax sweep`: the flag (without --), the values it compares,
    and which measurement it should move (what its plot shows)."""

    flag: str
    values: tuple[str, ...]  # "on"/"off" mean --flag / --no-flag
    moves: str  # a key of analysis.sweep.METRICS
    note: str | None = None  # where the server ignores it, say
    # take the values from the server's --help choices where it lists them (keep these, in order)
    from_help: bool = False


@dataclass(frozen=True)
class Function:
    """One function a what-if component is made of: "module:Qual.name", the process role
    it runs in, and whether it holds the GIL while it works ("held") or releases it
    ("released": native code such as a Rust tokenizer), which its slowdown copies."""

    target: str
    process: str
    gil: str = "held"

    def __post_init__(self) -> None:
        if self.gil not in ("held", "released") or ":" not in self.target:
            raise ValueError(f"bad what-if function {self}")


@dataclass(frozen=True)
class Component:
    """A part of the server `cputax whatif` can slow: the functions it is made of.

    `placebo`: on a path no request waits for; slowing it must show no effect."""

    name: str
    functions: tuple[Function, ...]
    meaning: str
    placebo: bool = False


@dataclass(frozen=True)
class ServerTable:
    name: str
    # (role, regular expression searched in /proc/PID/cmdline with NULs as spaces). Match
    # the cmdline, not comm: setproctitle rewrites argv, and comm is cut to 15 characters.
    processes: tuple[tuple[str, str], ...]
    # (process role glob, thread name glob, what the thread does)
    threads: tuple[tuple[str, str, str], ...]
    rules: tuple[Rule, ...]
    # path globs only this server's code has: how `auto` recognises a stack file
    markers: tuple[str, ...]
    metrics: MetricNames = field(default_factory=MetricNames)
    capabilities: Capabilities = field(default_factory=Capabilities)
    launch: Launch | None = None
    # roles of processes that are the front end (listen on the port); discovery prefers them
    front_end_roles: tuple[str, ...] = ()
    # a process whose title is one of these roles has the server's front end as parent
    child_roles: tuple[str, ...] = ()
    # what the report says about this server's categories beyond MEANINGS
    notes: Mapping[str, str] = field(default_factory=dict)
    presets: Mapping[str, Preset] = field(default_factory=dict)  # `cputax sweep --vary NAME`
    fixed_port: int | None = (
        None  # a user's command that names its own port (`--serve-cmd ... --port N`)
    )
    # `cputax whatif --component NAME`: the parts of the server a what-if can slow
    components: Mapping[str, Component] = field(default_factory=dict)
