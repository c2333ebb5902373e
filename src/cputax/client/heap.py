"""The cyclic garbage collector kept out of the measured part of a run.

A full collection walks every tracked object: in a client process that is the heap its
imports, tokenizer and prompts made (about 100,000 objects here), tens of milliseconds
on these machines. The loop reads no socket meanwhile, so a stream's tokens queue in the
kernel, are merged into one read, and get one stamp, the newest: a full collection in
the middle of a scenario put 30-50 ms errors into tokens' receive times at 256 streams.
`steady_heap` collects once before the measured part and freezes what is left
(`gc.freeze`), so the collections that still happen walk only what the scenario itself
made and keeps, which is small: records go to disk as they finish. Load shards are
forked inside it: they inherit the frozen heap, and their own use nests (a no-op), so
no collection in a shard writes to (and copies) the parent's pages.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["steady_heap"]

_depth = 0  # nested uses (a replay inside a scenario's window) freeze and thaw once


@contextmanager
def steady_heap() -> Iterator[None]:
    """Collect, then freeze the surviving heap out of the collector's walks until the end."""
    global _depth
    if _depth == 0:
        gc.collect()
        gc.freeze()
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            gc.unfreeze()
