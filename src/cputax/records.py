"""The records that cross stages, and their JSON(L) I/O.

Every stage reads what the previous one wrote, so a run directory can be rebuilt
into a report after a crash. Times are integer nanoseconds of
`time.monotonic_ns()`, the one clock all processes on the host share.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import IO, Any

import msgspec
import numpy as np
import orjson

from cputax.errors import CputaxError
from cputax.results.attribution import AttributionResult
from cputax.results.correlation import CorrelationResult
from cputax.results.nodes import NodeClock
from cputax.results.summary import GrowthRow, Summary

__all__ = [
    "TIMES",
    "JsonlWriter",
    "NodeResults",
    "RequestRecord",
    "RequestTable",
    "Results",
    "read_json",
    "read_jsonl",
    "read_request_table",
    "read_requests",
    "write_json",
]


@dataclass
class RequestRecord:
    """One streamed request, as the client saw it.

    Timestamps are None when the stream never got that far (an error before the
    first token leaves t_first_token None, and so on).
    """

    scenario: str
    index: int = 0  # position within the scenario
    batch: int | None = None  # closed-loop batch number, None for open-loop arrivals
    ok: bool = False
    error: str | None = None
    status: int | None = None
    t_start: int = 0  # request build begins
    t_sent: int | None = None  # request body written to the socket
    t_headers: int | None = None  # status line + headers received
    t_first_data: int | None = None  # first `data:` line
    t_first_token: int | None = None  # first delta carrying content/reasoning/tool-call text
    t_last_token: int | None = None
    t_end: int | None = None  # stream closed (after [DONE] or error)
    # The same moments as the kernel stamped the reads that carried them (SO_TIMESTAMPNS,
    # converted to the monotonic clock): independent of when the client's loop got to them.
    # None on the aiohttp path (https) and in runs recorded before cputax had them.
    t_headers_kernel: int | None = None
    t_first_data_kernel: int | None = None
    t_first_token_kernel: int | None = None
    t_last_token_kernel: int | None = None
    # Open-loop arrivals (Poisson, bursts): when the schedule meant the request to start;
    # t_start - t_intended is the client's schedule lag. None for closed-loop requests.
    t_intended: int | None = None
    build_s: float = 0.0  # client thread CPU building + encoding the request
    write_s: float | None = None  # writing the request: first send() call to the last byte taken
    parse_s: float = (
        0.0  # client time in the stream's parser (a clock, not the CPU's: equal unless preempted)
    )
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage" or "chunks"
    chunks: int = 0  # data lines carrying a delta
    # Token chunks that arrived in one read with a later token chunk: their stamps are that
    # later chunk's (the kernel merges segments the client has not read yet), so an upper
    # bound. Nonzero when the client fell a token behind, or the server wrote tokens together.
    shared_stamps: int = 0
    target_prompt_tokens: int | None = None  # what the workload asked for
    session: str | None = None  # agentic replay: conversation id
    turn: int | None = None
    subagent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The join key sent as X-Request-Id and as the trace id of a W3C traceparent (32 hex digits)
    request_id: str | None = None
    # The server's own account of the request (analysis.server_phases): from the final usage
    # chunk's `metrics` as the stream ends (source "response"), or from its OTLP span once
    # analysis joins spans.jsonl (source "otlp"). None when the server gave neither.
    server: dict[str, Any] | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(
            self
        )  # orjson writes a dataclass's fields in order, like asdict, 10x faster

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class JsonlWriter:
    """Append records to a JSONL file, flushed per record: a crash loses nothing finished."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fh: IO[bytes] = path.open("ab")

    def write(self, obj: Any) -> None:
        self.write_line(obj.to_json() if hasattr(obj, "to_json") else orjson.dumps(obj))

    def write_line(self, data: bytes) -> None:
        """One object already encoded (a load shard's record), without its newline."""
        self._fh.write(data + b"\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each object of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    with path.open("rb") as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if number == len(lines):
                return
            raise CputaxError(f"{path}:{number}: not a JSON object ({exc})") from exc


def read_requests(path: Path) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in read_jsonl(path)]


# --- requests.jsonl as columns ---------------------------------------------------------------
TIMES = (
    "t_start",
    "t_sent",
    "t_headers",
    "t_first_data",
    "t_first_token",
    "t_last_token",
    "t_end",
    "t_headers_kernel",
    "t_first_data_kernel",
    "t_first_token_kernel",
    "t_last_token_kernel",
    "t_intended",
)
NUMBERS = (
    "index",
    "batch",
    "status",
    "build_s",
    "write_s",
    "parse_s",
    "prompt_tokens",
    "output_tokens",
    "chunks",
    "shared_stamps",
    "target_prompt_tokens",
)
_NUMERIC = ("ok", *TIMES, *NUMBERS)
_TEXT = ("scenario", "error", "output_tokens_source")
BLOCK = 1 << 15  # rows decoded before they become columns: bounds the memory of the rows
SPLIT_BYTES = 32 << 20  # a requests.jsonl past this is read by several processes


class _Row(msgspec.Struct, gc=False):
    """The fields of a requests.jsonl line that analysis reads as columns. msgspec decodes a
    line straight into it (other fields skipped) at about a third of the cost of a dict."""

    scenario: str = ""
    ok: bool = False
    error: str | None = None
    output_tokens_source: str | None = None
    session: str | None = None
    t_start: float | None = None
    t_sent: float | None = None
    t_headers: float | None = None
    t_first_data: float | None = None
    t_first_token: float | None = None
    t_last_token: float | None = None
    t_end: float | None = None
    t_headers_kernel: float | None = None
    t_first_data_kernel: float | None = None
    t_first_token_kernel: float | None = None
    t_last_token_kernel: float | None = None
    t_intended: float | None = None
    write_s: float | None = None
    index: float | None = None
    batch: float | None = None
    status: float | None = None
    build_s: float | None = None
    parse_s: float | None = None
    prompt_tokens: float | None = None
    output_tokens: float | None = None
    chunks: float | None = None
    shared_stamps: float | None = None
    target_prompt_tokens: float | None = None


@dataclass
class RequestTable:
    """requests.jsonl as columns: what analysis reads when a run has a million requests.

    Every number is a float64 array, NaN where the record had None; times are
    `time.monotonic_ns()` values as floats (exact to the nanosecond below 2**53 ns, 104
    days of uptime; 2-4 ns beyond, far below what any phase is measured to). Text columns
    are codes into a list of names (scenario, output_tokens_source; -1 for None); `error`
    is an object array, None for the requests that succeeded. `replayed` holds the records
    of a replay's turns (they carry session, turn and sub-agent) for the agentic analysis,
    which walks them one by one; a plain run has none.
    """

    columns: dict[str, np.ndarray]
    ok: np.ndarray
    scenario: np.ndarray
    scenarios: list[str]
    source: np.ndarray
    sources: list[str]
    error: np.ndarray
    replayed: list[RequestRecord] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ok)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def where(self, mask: np.ndarray) -> RequestTable:
        """The rows where `mask` is true (replayed records are not carried)."""
        return RequestTable(
            {k: v[mask] for k, v in self.columns.items()},
            self.ok[mask],
            self.scenario[mask],
            self.scenarios,
            self.source[mask],
            self.sources,
            self.error[mask],
        )

    def of_scenario(self, name: str) -> RequestTable:
        code = self.scenarios.index(name) if name in self.scenarios else -2
        return self.where(self.scenario == code)

    def source_names(self) -> list[str]:
        """output_tokens_source values present among the successful rows, sorted."""
        return sorted(self.sources[i] for i in np.unique(self.source[self.ok]) if i >= 0)

    @classmethod
    def concat(cls, parts: list[RequestTable]) -> RequestTable:
        """The rows of every part, in order (their name codes mapped onto one list)."""
        scenarios: dict[str, int] = {}
        sources: dict[str, int] = {}

        def recode(codes: np.ndarray, names: list[str], into: dict[str, int]) -> np.ndarray:
            table = np.array([into.setdefault(n, len(into)) for n in names] + [-1], dtype=np.int32)
            return table[codes]  # -1 indexes the appended -1

        scenario = [recode(p.scenario, p.scenarios, scenarios) for p in parts]
        source = [recode(p.source, p.sources, sources) for p in parts]
        columns = {k: np.concatenate([p.columns[k] for p in parts]) for k in parts[0].columns}
        return cls(
            columns,
            np.concatenate([p.ok for p in parts]),
            np.concatenate(scenario),
            list(scenarios),
            np.concatenate(source),
            list(sources),
            np.concatenate([p.error for p in parts]),
            [r for p in parts for r in p.replayed],
        )

    @classmethod
    def from_records(cls, records: Iterable[RequestRecord]) -> RequestTable:
        builder = _Builder()
        records = list(records)
        builder.add(records, records.__getitem__)
        return builder.table()


class _Builder:
    """Rows in (a _Row or a RequestRecord: the same attribute names), RequestTable out, a block
    at a time."""

    def __init__(self) -> None:
        self._numeric_of = attrgetter(*_NUMERIC)
        self._text_of = attrgetter(*_TEXT)
        self._blocks: list[np.ndarray] = []
        self._codes: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self._scenario: list[np.ndarray] = []
        self._source: list[np.ndarray] = []
        self._error: list[str | None] = []
        self._replayed: list[RequestRecord] = []

    def add(
        self, rows: list[_Row] | list[RequestRecord], record: Callable[[int], RequestRecord]
    ) -> None:
        """A block of rows; record(i) makes the i-th one's full record when it is a replay's
        turn."""
        block = np.array(list(map(self._numeric_of, rows)), dtype=np.float64).reshape(
            -1, len(_NUMERIC)
        )
        self._blocks.append(
            np.ascontiguousarray(block.T)
        )  # a row per column: joined column by column
        if not rows:
            return
        scenario, error, source = zip(*map(self._text_of, rows), strict=True)
        self._scenario.append(self._encode(scenario, self._codes[0]))
        self._source.append(self._encode(source, self._codes[1]))
        self._error.extend(error)
        self._replayed += [record(i) for i, r in enumerate(rows) if r.session is not None]

    @staticmethod
    def _encode(values: tuple, codes: dict[str, int]) -> np.ndarray:
        for v in set(values):
            if v is not None and v not in codes:
                codes[v] = len(codes)
        return np.array([-1 if v is None else codes[v] for v in values], dtype=np.int32)

    def table(self) -> RequestTable:
        blocks, self._blocks = self._blocks or [np.empty((len(_NUMERIC), 0))], []
        columns = {name: np.concatenate([b[i] for b in blocks]) for i, name in enumerate(_NUMERIC)}
        del blocks
        ok = columns.pop("ok") == 1.0
        error = np.empty(len(self._error), dtype=object)
        error[:] = self._error

        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

        return RequestTable(
            columns,
            ok,
            joined(self._scenario),
            list(self._codes[0]),
            joined(self._source),
            list(self._codes[1]),
            error,
            self._replayed,
        )


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic GC while reading: a million rows hold no cycles, and the collector would
    walk every young tuple again and again (a fifth of the reading time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def read_request_table(path: Path, workers: int | None = None) -> RequestTable:
    """requests.jsonl as a RequestTable, read a block of lines at a time, so memory is the
    columns' and not the records'. A large file is cut at line ends into one range per
    CPU (at most `workers`), each decoded in a forked process. A torn last line (a crash
    mid-write) is skipped, as read_jsonl does; a bad line elsewhere is an error naming it."""
    if not path.exists():
        return _Builder().table()
    size = path.stat().st_size
    workers = min(workers or os.cpu_count() or 1, max(1, size // SPLIT_BYTES))
    if workers <= 1 or sys.platform != "linux":
        return _read_range(path, 0, size)
    cuts = [0]
    with path.open("rb") as fh:
        for k in range(1, workers):
            fh.seek(max(cuts[-1], k * size // workers))
            fh.readline()  # to the start of the next line
            cuts.append(fh.tell())
    cuts.append(size)
    ranges = [(a, b) for a, b in itertools.pairwise(cuts) if b > a]
    try:
        with ProcessPoolExecutor(
            len(ranges), mp_context=multiprocessing.get_context("fork")
        ) as pool:
            parts = list(pool.map(_read_range, [path] * len(ranges), *zip(*ranges, strict=True)))
    except CputaxError:
        return _read_range(path, 0, size)  # again in one piece, for the bad line's number
    return RequestTable.concat(parts)


def _read_range(path: Path, start: int, end: int) -> RequestTable:
    """The records of the lines in bytes [start, end) of the file (start at a line's start)."""
    builder = _Builder()
    decode = msgspec.json.Decoder(_Row).decode
    first = 1  # the line number of the block's first line (exact when start is 0)
    with path.open("rb") as fh, _gc_paused():
        fh.seek(start)
        left = end - start
        while left > 0 and (lines := list(itertools.islice(fh, BLOCK))):
            for k, line in enumerate(lines):
                left -= len(line)
                if left <= 0:
                    del lines[k + 1 :]
                    break
            try:
                rows = list(map(decode, lines))
            except (msgspec.DecodeError, msgspec.ValidationError):  # a blank, bad or torn line
                lines, rows = _good_rows(
                    path, fh, lines, first, decode, at_end=left <= 0 and end == path.stat().st_size
                )
            builder.add(
                rows, lambda i, lines=lines: RequestRecord.from_dict(orjson.loads(lines[i]))
            )
            first += BLOCK
    return builder.table()


def _good_rows(
    path: Path,
    fh: IO[bytes],
    lines: list[bytes],
    first: int,
    decode: Callable[[bytes], _Row],
    at_end: bool,
) -> tuple[list[bytes], list[_Row]]:
    """The block's lines and rows without blank lines and a torn last line of the file;
    CputaxError for a bad line anywhere else."""
    kept, rows = [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(decode(line))
            kept.append(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if k == len(lines) - 1 and at_end:
                break  # the file's last line, torn by a crash mid-write
            raise CputaxError(f"{path}:{first + k}: not a request record ({exc})") from exc
    return kept, rows


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    try:
        return orjson.loads(path.read_bytes())
    except FileNotFoundError as exc:
        raise CputaxError(f"{path}: no such file") from exc
    except orjson.JSONDecodeError as exc:
        raise CputaxError(f"{path}: not valid JSON ({exc})") from exc


@dataclass
class NodeResults:
    """A Ray run's server node: the clock conversion its times rest on (clock.json), its
    CPU attribution and correlation (nodes/<node>/, as for the run's own machine)."""

    clock: NodeClock | None = None  # None: the node wrote no clock.json
    attribution: AttributionResult | None = None
    correlation: CorrelationResult | None = None


@dataclass
class Results:
    """What analysis derives from one run directory: everything the report renders.

    `info` is run.json; `summary` is summary.json's Summary (cputax.results.summary);
    `attribution` and `correlation` are what pyspy/attribution.json and correlation.json
    hold; `views` are the
    flamegraph and speedscope files, relative to the run directory.
    """

    info: dict[str, Any]
    summary: Summary
    attribution: AttributionResult | None = None
    correlation: CorrelationResult | None = None
    views: list[str] = field(default_factory=list)
    # HTTP overhead vs concurrency per context size (analysis.decompose.http_overhead_growth)
    growth: list[GrowthRow] = field(default_factory=list)
    name: str = ""  # the run directory's name, for titles
    nodes: dict[str, NodeResults] = field(default_factory=dict)  # a Ray run's server nodes
