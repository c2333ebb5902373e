"""guidellm as a peer client: `guidellm run`, as a user runs it, against the stub.

It is given one scenario file (its own format: the backend, a concurrent profile with a
warm-up of one request per stream, synthetic prompts, a request count, a JSON output)
and what is compared is what its JSON report keeps per request: the response id (the
stub keys its truth by it when no X-Request-ID comes), the request's start and its first
and last token, wall-clock seconds (time.time), brought to the monotonic clock with one
`wire.Clock` read after the run. guidellm keeps no time per token, so it has no
inter-token error here. Its CPU: peers.process.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson

from cputax.client.wire import Clock
from cputax.peers.process import find_cli, run_cli, tokenizer_dir

__all__ = ["ENV", "find", "parse_report", "run", "scenario"]

ENV = "CPUTAX_GUIDELLM"
REPORT = "benchmarks.json"


def find() -> str | None:
    """The `guidellm` executable: $CPUTAX_GUIDELLM, else on PATH."""
    return find_cli(ENV, "guidellm")


def scenario(
    url: str, model: str, streams: int, requests: int, tokens: int, out: Path
) -> dict[str, Any]:
    """The scenario file for this load: streaming chat, a closed loop of `streams`, one
    warm-up request per stream, then `requests` measured ones."""
    return {
        "spec": {
            "backend": {
                "kind": "openai_http",
                "target": url,
                "model": model,
                "request_format": "/v1/chat/completions",
            },
            "profile": {
                "kind": "concurrent",
                "streams": streams,
                "warmup": {"value": streams, "mode": "requests"},
            },
            "tokenizer": {"kind": "huggingface_auto", "model": tokenizer_dir()},
            "data": [{"kind": "synthetic_text", "prompt_tokens": 32, "output_tokens": tokens}],
            "constraints": [{"kind": "max_requests", "count": requests + streams}],
            "outputs": [{"kind": "json", "path": str(out / REPORT)}],
        }
    }


def run(url: str, model: str, streams: int, requests: int, tokens: int) -> dict[str, Any]:
    """One guidellm run: its measured requests, their wall time and its tree's CPU, both
    scaled to the measured requests' share of the tokens that came in that time."""
    exe = find()
    if exe is None:
        raise RuntimeError(f"guidellm not found (set {ENV} or put it on PATH)")
    with tempfile.TemporaryDirectory(prefix="cputax-guidellm-") as tmp:
        out = Path(tmp)
        (out / "scenario.json").write_bytes(
            orjson.dumps(scenario(url, model, streams, requests, tokens, out))
        )
        cpu = run_cli(
            "guidellm",
            [exe, "run", "-c", str(out / "scenario.json"), "--disable-console-interactive"],
            out,
        )
        found = parse_report(out / REPORT, Clock.measure())
    if not found["requests"]:
        raise RuntimeError("guidellm's report holds no requests")
    start, end, share = found.pop("start_ns"), found.pop("end_ns"), found.pop("share")
    return {
        **found,
        "wall_ns": round((end - start) * share),
        "cpu_s": cpu.between(start, end) * share,
    }


def parse_report(path: Path, clock: Clock) -> dict[str, Any]:
    """The measured requests of guidellm's report, as peers compares them: key, ok,
    error, first (monotonic ns), no tokens; the first one's start and the last one's end
    (monotonic ns); and `share`, the measured requests' part of the tokens that came in
    between.

    The report lists the warm-up's requests too. Its warm-up ends when that many requests
    have finished, so the requests started before the benchmark's start are warm-up, and
    some of them are still streaming after it: their tokens in the window, counted as if
    they came evenly between their first and last, are the part of the window's CPU that
    is not the measured requests'."""

    def mono(seconds: float) -> int:
        return clock.monotonic(round(seconds * 1e9))

    report = orjson.loads(path.read_bytes())
    requests: list[dict[str, Any]] = []
    earlier: list[tuple[int, int, int]] = []  # warm-up requests: first token, last token, tokens
    start = end = None
    for bench in report.get("benchmarks") or []:
        begin = bench.get("start_time")
        groups = bench.get("requests") or {}
        for status in ("successful", "errored", "incomplete"):
            for r in groups.get(status) or []:
                timings = (r.get("info") or {}).get("timings") or {}
                t0, t1 = (
                    timings.get("request_start"),
                    timings.get("request_end") or timings.get("resolve_end"),
                )
                first, last = (
                    timings.get("first_token_iteration"),
                    timings.get("last_token_iteration"),
                )
                if t0 is None or (begin is not None and t0 < begin):
                    if first is not None and last is not None:
                        earlier.append(
                            (mono(first), mono(last), timings.get("token_iterations") or 0)
                        )
                    continue
                start = min(start or mono(t0), mono(t0))
                if t1 is not None:
                    end = max(end or mono(t1), mono(t1))
                requests.append(
                    {
                        "key": r.get("response_id"),
                        "ok": status == "successful",
                        "error": r.get("error") or (None if status == "successful" else status),
                        "first": mono(first) if first is not None else None,
                        "first_kernel": None,
                        "tokens": [],
                        "tokens_kernel": [],
                        "n_tokens": timings.get("token_iterations") or 0,
                    }
                )
    start, end = start or 0, end or 0
    measured = sum(r.pop("n_tokens") for r in requests)
    overlap = sum(
        n * max(0, min(last, end) - max(first, start)) / (last - first)
        for first, last, n in earlier
        if last > first
    )
    return {
        "requests": requests,
        "start_ns": start,
        "end_ns": end,
        "share": measured / (measured + overlap) if measured else 1.0,
    }
