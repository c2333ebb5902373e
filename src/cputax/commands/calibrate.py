"""`cputax calibrate`: the client's own floor against the stub, as a table or JSON."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from cputax.peers.calibrate import peers, run_calibration, save_ceiling

__all__ = ["calibrate", "show_peers"]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _table(result: dict[str, Any]) -> None:
    stub = result["timed_stub"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"Client floor against the stub: headers after {stub['headers_delay_ms']:g} ms, "
                  f"first token +{stub['first_token_delay_ms']:g} ms, a token every "
                  f"{stub['inter_token_delay_ms']:g} ms, {stub['output_tokens']} tokens")
    columns = {"concurrency": "conc", "requests": "reqs", "errors": "err",
               "client_cpu_us_per_chunk": "CPU us/chunk\n(process)", "parse_cpu_us_per_chunk": "parse\nus/chunk",
               "offered_chunks_per_s": "offered\nchunk/s", "max_chunks_per_s": "ceiling\nchunk/s",
               "ttft_error_ms_p50": "TTFT err ms\nloop p50", "ttft_error_ms_p99": "\nloop p99",
               "ttft_error_kernel_ms_p50": "\nkernel p50", "ttft_error_kernel_ms_p99": "\nkernel p99",
               "itl_error_ms_p99": "ITL err ms\nloop p99", "itl_error_kernel_ms_p99": "\nkernel p99",
               "client_lag_ms_p99": "client lag\np99 ms", "shared_stamps_pct": "shared\nstamps %"}
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for level in result["levels"]:
        table.add_row(*(_number(level[k]) for k in columns))
    console = Console()
    console.print(table)
    past = [str(lv["concurrency"]) for lv in result["levels"] if lv["past_ceiling"]]
    if past:
        console.print(f"Past the ceiling at concurrency {', '.join(past)}: the offered rate is above "
                      "80% of what client and stub can do together here; the loop's stamps there include "
                      "the client falling behind, the kernel's do not. A run whose chunk rate is that high "
                      "measures this machine as much as the server.")
    console.print(f"Kernel receive stamps: {'yes' if result['kernel_stamps'] else 'no (loop stamps only)'}; "
                  f"realtime -> monotonic conversion error {result['clock_conversion_error_us']:g} us"
                  + (f"; the wall clock was set {result['clock_steps']} time(s) meanwhile, and the "
                     "conversion read again" if result.get("clock_steps") else "") + ".")
    console.print(f"Note: {result['note']}.")
    for level in result["levels"]:
        if "first_error" in level:
            console.print(f"concurrency {level['concurrency']}: first error: {level['first_error']}")


def show_peers(result: dict[str, Any]) -> None:
    """The peer table (calibrate --peers, bench/bench_client.py)."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title="Load clients side by side against one stub (each in its own process, the order alternating)")
    for heading in ("client", "streams", "stamps", "CPU us/chunk", "range", "vs cputax", "range",
                    "TTFT err ms p50", "p99", "ITL err ms p99", "max chunk/s", "vs cputax"):
        table.add_column(heading, justify="left" if heading in ("client", "stamps") else "right")

    def ratio(r: dict[str, Any], key: str) -> str:
        value = (r.get("vs_cputax") or {}).get(key)
        return "" if value is None else f"{value:.2f}x"

    def spread(pair: list[float] | None, unit: str = "") -> str:
        return "" if not pair or pair[0] == pair[1] else f"{_number(pair[0])}-{_number(pair[1])}{unit}"

    for r in result["peers"]:
        table.add_row(r["client"], str(r["streams"]), r["stamps"], _number(r["cpu_us_per_chunk"]),
                      spread(r.get("cpu_us_per_chunk_range")), ratio(r, "cpu_us_per_chunk"),
                      spread((r.get("vs_cputax") or {}).get("cpu_us_per_chunk_range"), "x"),
                      _number(r["ttft_error_ms_p50"]), _number(r["ttft_error_ms_p99"]),
                      _number(r["itl_error_ms_p99"]), _number(r["max_chunks_per_s"]), ratio(r, "max_chunks_per_s"))
    console = Console()
    console.print(table)
    for s in result["skipped"]:
        console.print(f"{s['client']}: skipped: {s['why']}")
    console.print("CPU: user + system of the client's whole process, start-up, imports and a first round of one "
                  "request a stream left out, alike for every client; with repeats, the median and range over them, "
                  "and the ratio to cputax repeat by repeat (the two ran one after the other). cputax's errors are "
                  "those of its kernel receive stamps (what its runs report); the others' of their loop's. AIPerf and "
                  "guidellm run as their own command lines: their whole process tree's CPU (psutil) over their "
                  "measured requests; guidellm keeps no time per token (no ITL error).")
    console.print(f"Note: {result['note']}.")


def calibrate(concurrencies: list[int], as_json: bool = False, requests_per_level: int | None = None,
              with_peers: bool = False) -> int:
    """Run `cputax calibrate`; 1 if any request failed (the numbers are then suspect), else 0."""
    if with_peers:
        result = peers(concurrencies, requests_per_level)
        failed = any(r["errors"] for r in result["peers"])
        show = show_peers
    else:
        result = asyncio.run(run_calibration(concurrencies, requests_per_level))
        failed = any(level["errors"] for level in result["levels"])
        show = _table
        if not failed:
            kept = save_ceiling(result)
            Console(stderr=True).print(f"ceiling kept in {kept}: `cputax run` notes scenarios that come near it")
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        show(result)
    return 1 if failed else 0
