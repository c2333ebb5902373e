"""Reading the server's /metrics during a run: one scrape before and after each scenario,
and its gauges (requests running, waiting, KV-cache use) polled in between."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from cputax.prometheus import gauge_values, parse_metrics
from cputax.records import JsonlWriter

__all__ = [
    "FIRST_POLL_S",
    "GAUGE_POLL_S",
    "SCRAPE_TIMEOUT_S",
    "metrics_probe",
    "poll_gauges",
    "scrape",
]

# /metrics costs the API server CPU (vLLM 0.32, 389 series: ~10 ms a scrape on the 2-core
# development machine), so the gauges are polled once a second, the first time a quarter of a
# second in, when the scenario's requests are in flight. The analysis keeps only polls taken
# while requests were in flight.
GAUGE_POLL_S = 1.0
FIRST_POLL_S = 0.25
# A scrape's own bound: a /metrics that hangs must not hold a scenario's end (or the gauge
# poller) for the per-request timeout. The probe's is --probe-timeout.
SCRAPE_TIMEOUT_S = 5.0


async def _fetch(client: Any, timeout_s: float) -> tuple[str | None, dict[str, float], str | None]:
    """(/metrics as Prometheus text, its values, None) or (None, {}, why not)."""
    try:
        status, text = await asyncio.wait_for(client.get_text("/metrics"), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        return None, {}, f"no answer within {timeout_s:g} s"
    except Exception as exc:
        return None, {}, str(exc)
    if status != 200:
        return None, {}, f"HTTP {status}"
    try:
        values = parse_metrics(text)
    except Exception as exc:  # prometheus_client's parser raises ValueError (and worse) on it
        why = " ".join(str(exc).split())[:100]
        return None, {}, f"not Prometheus text ({type(exc).__name__}: {why})"
    return text, values, None


async def metrics_probe(
    client: Any, timeout_s: float = SCRAPE_TIMEOUT_S
) -> tuple[bool, str | None]:
    """Whether the server has a usable /metrics; when not, why (None: it has none, a 404)."""
    text, _, why = await _fetch(client, timeout_s)
    if text is not None:
        return True, None
    return False, None if why in ("HTTP 404", "HTTP 405") else why


async def scrape(client: Any, has_metrics: bool) -> str | None:
    """The server's /metrics text, or None (no metrics, the scrape failed or timed out, or
    the answer is not Prometheus text: a scrape that cannot be read is no scrape)."""
    if not has_metrics:
        return None
    return (await _fetch(client, SCRAPE_TIMEOUT_S))[0]


async def poll_gauges(client: Any, path: Path, stop: asyncio.Event) -> None:
    """Append the gauges of every scrape to `path` until `stop` is set."""
    with JsonlWriter(path) as writer:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), FIRST_POLL_S)
        while not stop.is_set():
            try:
                status, text = await asyncio.wait_for(client.get_text("/metrics"), SCRAPE_TIMEOUT_S)
            except Exception:  # no answer in time, a broken connection: no poll this second
                status, text = None, ""
            values = gauge_values(text) if status == 200 else {}
            if values:
                writer.write({"t_ns": time.monotonic_ns(), **values})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), GAUGE_POLL_S)
