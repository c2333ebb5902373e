"""cputax's own client measured against the stub: alone, and beside other load clients.

    calibrate  `cputax calibrate`: the client's floor (timing error, CPU per chunk) and
               the machine's ceiling, against stubs whose timings are known; `peers()`
               runs every client below at the same levels and compares them
    clients    one client per process (`python -m cputax.peers.clients CLIENT ...`):
               cputax, vLLM's benchmark client, and the command-line peers
    aiperf     AIPerf through its own command line and its JSONL export
    guidellm   guidellm through its own command line and its JSON report
    process    what both command-line peers share: finding them, their tree's CPU, reaping

Nothing here runs during `cputax run`; only the ceiling calibrate saved is read there.
The package imports nothing on import: a peer's child process loads only what it needs.
"""

__all__: list[str] = []
