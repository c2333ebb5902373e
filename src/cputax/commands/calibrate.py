"""`cputax calibrate`: the client's own floor against the stub, as a table or JSON."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import orjson
from rich import box
from rich.console import Console
from rich.table import Table

from cputax.client.calibrate import run_calibration

__all__ = ["calibrate"]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _table(result: dict[str, Any]) -> None:
    stub = result["timed_stub"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title=f"Client floor against the stub: headers after {stub['headers_delay_ms']:g} ms, "
                  f"first token +{stub['first_token_delay_ms']:g} ms, a token every "
                  f"{stub['inter_token_delay_ms']:g} ms, {stub['output_tokens']} tokens")
    columns = {"concurrency": "conc", "requests": "reqs", "errors": "err",
               "client_cpu_us_per_chunk": "parse CPU\nus/chunk", "offered_chunks_per_s": "offered\nchunk/s",
               "max_chunks_per_s": "max\nchunk/s", "ttft_error_ms_p50": "TTFT err\np50 ms",
               "ttft_error_ms_p99": "\np99 ms", "headers_error_ms_p50": "hdr err\np50 ms",
               "headers_error_ms_p99": "\np99 ms"}
    for heading in columns.values():
        table.add_column(heading, justify="right")
    for level in result["levels"]:
        table.add_row(*(_number(level[k]) for k in columns))
    console = Console()
    console.print(table)
    console.print(f"Build CPU per request (us): {', '.join(_number(lv['client_build_cpu_us']) for lv in result['levels'])}.")
    console.print(f"Note: {result['note']}.")
    for level in result["levels"]:
        if "first_error" in level:
            console.print(f"concurrency {level['concurrency']}: first error: {level['first_error']}")


def calibrate(concurrencies: list[int], as_json: bool = False, requests_per_level: int | None = None) -> int:
    """Run `cputax calibrate`; 1 if any request failed (the numbers are then suspect), else 0."""
    result = asyncio.run(run_calibration(concurrencies, requests_per_level))
    if as_json:
        sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        _table(result)
    return 1 if any(level["errors"] for level in result["levels"]) else 0
