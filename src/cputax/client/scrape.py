"""Reading the server's /metrics during a run: one scrape before and after each scenario,
and its gauges (requests running, waiting, KV-cache use) polled in between."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from cputax.prometheus import parse_metrics
from cputax.records import JsonlWriter

__all__ = ["FIRST_POLL_S", "GAUGE_POLL_S", "poll_gauges", "scrape"]

# /metrics costs the API server CPU (vLLM 0.32, 389 series: ~10 ms a scrape on the 2-core
# development machine), so the gauges are polled once a second, the first time a quarter of a
# second in, when the scenario's requests are in flight. The analysis keeps only polls taken
# while requests were in flight.
GAUGE_POLL_S = 1.0
FIRST_POLL_S = 0.25


async def scrape(client: Any, has_metrics: bool) -> str | None:
    """The server's /metrics text, or None (no metrics, or the scrape failed)."""
    if not has_metrics:
        return None
    with contextlib.suppress(Exception):
        status, text = await client.get_text("/metrics")
        if status == 200:
            return text
    return None


async def poll_gauges(client: Any, path: Path, stop: asyncio.Event) -> None:
    """Append the gauges of every scrape to `path` until `stop` is set."""
    with JsonlWriter(path) as writer:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), FIRST_POLL_S)
        while not stop.is_set():
            text = await scrape(client, True)
            if text is not None:
                values = parse_metrics(text)
                writer.write({"t_ns": time.monotonic_ns(), **{k: v for k, v in values.items() if not k.endswith(("_sum", "_count", "_total"))}})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), GAUGE_POLL_S)
