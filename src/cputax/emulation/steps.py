"""emulated-gpu.jsonl: one line per model step of the emulated GPU, the exact truth of
when it was busy (CLOCK_MONOTONIC ns, the clock cputax uses everywhere).

Written by the plugin inside vLLM's worker as each step ends (one os.write of a whole
line, O_APPEND), read by the `emulated` telemetry source and the analysis.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LOG_ENV", "StepLog", "StepRecord", "read_steps"]

LOG_ENV = "CPUTAX_EMULATED_GPU_LOG"  # where the worker appends its steps


@dataclass(frozen=True)
class StepRecord:
    t0_ns: int  # the forward pass began (monotonic)
    t1_ns: int  # it returned: the emulated GPU was busy in between
    model_ns: int  # the modelled step time the forward slept towards
    prefill_tokens: int  # new tokens of requests that are not decoding
    decode_seqs: int  # requests decoding one token
    context_tokens: int  # all scheduled requests' context, their new tokens included
    reqs: int
    cpu_ns: int  # the forward's own CPU time (thread time), without the write of this line
    woke_ns: int = 0  # when the forward's thread ran again after t1 (a core free, the GIL back)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode() + b"\n"


class StepLog:
    """Appends records to the file named by LOG_ENV (opened on first write); none when unset."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, record: StepRecord) -> None:
        if not self.path:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, record.to_json())


def read_steps(path: Path, offset: int = 0) -> Iterator[tuple[StepRecord, int]]:
    """Each whole line's record from byte `offset` on, with the offset after it (a line the
    writer has not finished yet is left for the next read)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    return
                offset += len(line)
                try:
                    yield StepRecord(**json.loads(line)), offset
                except (ValueError, TypeError):
                    continue  # not a step record: skipped, never fatal
    except FileNotFoundError:
        return
