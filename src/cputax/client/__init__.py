"""The client side of a measurement: talking to the server and timing every request.

    sse        the stream's events -> a RequestRecord's timestamps
    stream     StreamingClient: one streamed request -> one RequestRecord (aiohttp)
    loadgen    closed-loop batches, duration, Poisson and burst arrivals
    sessions   agent traces replayed as user sessions, sub-agents beside their parents
    probes     what is asked before the load (model, token counter, ignore_eos, tools)
    scrape     the server's /metrics before, during and after each scenario
    calibrate  the client's own floor against the stub
"""

from cputax.client.calibrate import run_calibration
from cputax.client.loadgen import Window, run_scenario, warm_up
from cputax.client.probes import (
    Probes,
    accepts_ignore_eos,
    preflight,
    probe,
    server_counter,
    server_version,
    tool_mode,
)
from cputax.client.scrape import poll_gauges, scrape
from cputax.client.sessions import SCENARIO as REPLAY_SCENARIO
from cputax.client.sessions import Pacing, Replay
from cputax.client.sse import StreamError, StreamParser
from cputax.client.stream import StreamingClient

__all__ = [
    "REPLAY_SCENARIO", "Pacing", "Probes", "Replay", "StreamError", "StreamParser", "StreamingClient", "Window",
    "accepts_ignore_eos", "poll_gauges", "preflight", "probe", "run_calibration", "run_scenario", "scrape",
    "server_counter", "server_version", "tool_mode", "warm_up",
]
