"""Load clients side by side against the stub: cputax, vLLM's own benchmark client, AIPerf,
guidellm.

Each client runs in a process of its own against one timed stub (first token after
20 ms, a token every 5 ms, 64 tokens, its send times kept) and one zero-delay stub (the
most chunks/s), at each level of streams, the order alternating between levels and
repeats (peers.calibrate.peers). AIPerf and guidellm run too where they are found
($CPUTAX_AIPERF / $CPUTAX_GUIDELLM, or on PATH: their own command lines,
peers.aiperf and peers.guidellm);
each is skipped with a line where it is not. Reported per client and level: CPU per chunk of the
whole client process, TTFT and ITL error p50/p99 against the stub's truth, the most
chunks/s, and each as a ratio to cputax; the CPU model goes with the figures.

    python bench/bench_client.py [--streams 32,256] [--repeat 3] [--aiohttp] [--json out.json]
    python bench/bench_client.py --quick     # the shortest run: checks the benchmark works

No figure here is asserted anywhere: it is a measurement (run it on a quiet machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cputax.commands.calibrate import show_peers
from cputax.peers.calibrate import failed, peers
from cputax.peers.clients import AIOHTTP, PEERS
from cputax.results import format as result_format


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--streams", default="32,256", help="comma-separated stream counts (default 32,256)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per client and level, alternating (default 3)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per run (default 4 x streams, at least 32)",
    )
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="4 streams, 8 requests, once: that it runs, not a figure",
    )
    parser.add_argument(
        "--aiohttp",
        action="store_true",
        help="also cputax streaming through aiohttp (loop stamps only), beside its own HTTP path",
    )
    args = parser.parse_args()
    if args.quick:
        streams, repeat, requests = [4], 1, 8
    else:
        streams, repeat, requests = (
            [int(s) for s in args.streams.split(",")],
            args.repeat,
            args.requests,
        )
    clients = PEERS + ((AIOHTTP,) if args.aiohttp else ())
    result = peers(streams, requests, clients=clients, repeat=repeat)
    if args.json:
        args.json.write_bytes(result_format.encode(result))
    show_peers(result)
    return 1 if failed(result) else 0


if __name__ == "__main__":
    sys.exit(main())
