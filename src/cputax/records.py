"""The records that cross stages, and their JSON(L) I/O.

Every stage reads what the previous one wrote, so a run directory can be rebuilt
into a report after a crash. Times are integer nanoseconds of
`time.monotonic_ns()`, the one clock all processes on the host share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from cputax.errors import CputaxError


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
    build_s: float = 0.0  # client thread CPU building + encoding the request
    parse_s: float = 0.0  # client thread CPU parsing the stream
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None  # "usage" or "chunks"
    chunks: int = 0  # data lines carrying a delta
    target_prompt_tokens: int | None = None  # what the workload asked for
    session: str | None = None  # agentic replay: conversation id
    turn: int | None = None
    subagent: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

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
        data = obj.to_json() if hasattr(obj, "to_json") else orjson.dumps(obj)
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
class Results:
    """What analysis derives from one run directory: everything the report renders.

    `info` is run.json; `summary`, `attribution` and `correlation` are what
    summary.json, pyspy/attribution.json and correlation.json hold; `views` are the
    flamegraph and speedscope files, relative to the run directory.
    """

    info: dict[str, Any]
    summary: dict[str, Any]
    attribution: dict[str, Any] | None = None
    correlation: dict[str, Any] | None = None
    views: list[str] = field(default_factory=list)
    growth: list[dict[str, Any]] = field(default_factory=list)  # HTTP overhead vs concurrency per context
    name: str = ""  # the run directory's name, for titles
