"""The client side of a measurement: talking to the server and timing every request.

    sse        the stream's events -> a RequestRecord's timestamps
    wire       the streaming path's own HTTP/1.1: asyncio sockets, kernel receive stamps
    stream     StreamingClient: one streamed request -> one RequestRecord
    loadgen    closed-loop batches, duration, Poisson and burst arrivals
    shards     the same load from N forked processes, each with its own event loop
    heap       the garbage collector kept out of the measured part of a run
    sessions   agent traces replayed as user sessions, sub-agents beside their parents
    probes     what is asked before the load (model, token counter, ignore_eos, tools)
    scrape     the server's /metrics before, during and after each scenario

The client measured against the stub, alone and beside other load clients, is the
package cputax.peers.
"""

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
    "REPLAY_SCENARIO",
    "Pacing",
    "Probes",
    "Replay",
    "StreamError",
    "StreamParser",
    "StreamingClient",
    "Window",
    "accepts_ignore_eos",
    "poll_gauges",
    "preflight",
    "probe",
    "run_scenario",
    "scrape",
    "server_counter",
    "server_version",
    "tool_mode",
    "warm_up",
]
