"""`cputax calibrate`: the client's own floor against the stub, as a table or JSON."""

from __future__ import annotations

import asyncio
import sys

from rich import box
from rich.console import Console
from rich.table import Table

from cputax.peers.calibrate import ceiling_line, failed, peers, run_calibration, save_ceiling
from cputax.results import format as result_format
from cputax.results.calibration import Calibration, PairedRatios, PeerRow, PeersResult

__all__ = ["calibrate", "show_peers"]

# the level's columns: its field, the heading
_COLUMNS = {
    "concurrency": "conc",
    "requests": "reqs",
    "errors": "err",
    "client_cpu_us_per_chunk": "CPU us/chunk\n(process)",
    "parse_cpu_us_per_chunk": "parse\nus/chunk",
    "offered_chunks_per_s": "offered\nchunk/s",
    "max_chunks_per_s": "ceiling\nchunk/s",
    "ttft_error_ms_p50": "TTFT err ms\nloop p50",
    "ttft_error_ms_p99": "\nloop p99",
    "ttft_error_kernel_ms_p50": "\nkernel p50",
    "ttft_error_kernel_ms_p99": "\nkernel p99",
    "itl_error_ms_p99": "ITL err ms\nloop p99",
    "itl_error_kernel_ms_p99": "\nkernel p99",
    "client_lag_ms_p99": "client lag\np99 ms",
    "shared_stamps_pct": "shared\nstamps %",
}


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _table(result: Calibration) -> None:
    stub = result.timed_stub
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=f"Client floor against the stub: headers after {stub.headers_delay_ms:g} "
        f"ms, first token +{stub.first_token_delay_ms:g} ms, a token every "
        f"{stub.inter_token_delay_ms:g} ms, {stub.output_tokens} tokens",
    )
    for heading in _COLUMNS.values():
        table.add_column(heading, justify="right")
    for level in result.levels:
        table.add_row(*(_number(getattr(level, field)) for field in _COLUMNS))
    console = Console()
    console.print(table)
    past = ceiling_line(result)
    if past:
        console.print(past)
    stamps = "yes" if result.kernel_stamps else "no (loop stamps only)"
    steps = (
        f"; the wall clock was set {result.clock_steps} time(s) meanwhile, and the "
        "conversion read again"
        if result.clock_steps
        else ""
    )
    console.print(
        f"Kernel receive stamps: {stamps}; realtime -> monotonic conversion error "
        f"{result.clock_conversion_error_us:g} us{steps}."
    )
    console.print(f"Note: {result.note}.")
    for level in result.levels:
        if level.first_error is not None:
            console.print(f"concurrency {level.concurrency}: first error: {level.first_error}")


def _ratio(ratios: PairedRatios | None, field: str) -> str:
    value = None if ratios is None else getattr(ratios, field)
    return "" if value is None else f"{value:.2f}x"


def _spread(pair: list[float] | None, unit: str = "") -> str:
    return "" if not pair or pair[0] == pair[1] else f"{_number(pair[0])}-{_number(pair[1])}{unit}"


def _peer_cells(r: PeerRow) -> list[str]:
    vs = r.vs_cputax
    return [
        r.client,
        str(r.streams),
        r.stamps,
        _number(r.cpu_us_per_chunk),
        _spread(r.cpu_us_per_chunk_range),
        _ratio(vs, "cpu_us_per_chunk"),
        _spread(vs.cpu_us_per_chunk_range if vs else None, "x"),
        _number(r.ttft_error_ms_p50),
        _number(r.ttft_error_ms_p99),
        _number(r.itl_error_ms_p99),
        _number(r.max_chunks_per_s),
        _ratio(vs, "max_chunks_per_s"),
    ]


def show_peers(result: PeersResult) -> None:
    """The peer table (calibrate --peers, bench/bench_client.py)."""
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title="Load clients side by side against one stub (each in its own process, "
        "the order alternating)",
    )
    for heading in (
        "client",
        "streams",
        "stamps",
        "CPU us/chunk",
        "range",
        "vs cputax",
        "range",
        "TTFT err ms p50",
        "p99",
        "ITL err ms p99",
        "max chunk/s",
        "vs cputax",
    ):
        table.add_column(heading, justify="left" if heading in ("client", "stamps") else "right")
    for r in result.peers:
        table.add_row(*_peer_cells(r))
    console = Console()
    console.print(table)
    for s in result.skipped:
        console.print(f"{s.client}: skipped: {s.why}")
    console.print(
        "CPU: user + system of the client's whole process, start-up, imports and a first round "
        "of one request a stream left out, alike for every client; with repeats, the median and "
        "range over them, and the ratio to cputax repeat by repeat (the two ran one after the "
        "other). cputax's errors are those of its kernel receive stamps (what its runs report); "
        "the others' of their loop's. AIPerf and guidellm run as their own command lines: their "
        "whole process tree's CPU (psutil) over their measured requests; guidellm keeps no time "
        "per token (no ITL error)."
    )
    console.print(f"Note: {result.note}.")


def calibrate(
    concurrencies: list[int],
    as_json: bool = False,
    requests_per_level: int | None = None,
    with_peers: bool = False,
) -> int:
    """Run `cputax calibrate`; 1 if any request failed (the numbers are then suspect), else 0."""
    result: Calibration | PeersResult
    if with_peers:
        result = peers(concurrencies, requests_per_level)
    else:
        result = asyncio.run(run_calibration(concurrencies, requests_per_level))
        if not failed(result):
            kept = save_ceiling(result)
            Console(stderr=True).print(
                f"ceiling kept in {kept}: `cputax run` notes scenarios that come near it"
            )
    if as_json:
        sys.stdout.write(result_format.encode(result).decode() + "\n")
    elif isinstance(result, PeersResult):
        show_peers(result)
    else:
        _table(result)
    return 1 if failed(result) else 0
