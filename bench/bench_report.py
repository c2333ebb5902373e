"""`cputax report` on a large run directory: wall time and peak memory.

Sharded and Ray runs write millions of requests; the report must read them in seconds.
This builds a run directory of --requests requests (default 1,000,000) shaped like a
closed-loop profile (several scenarios, concurrency 1-256, 1k-100k-token prompts, both
clocks' stamps, a few failures, Prometheus scrapes and gauge polls), then times
`cputax report DIR` as its own process, as a user would run it, --repeat times:

    python bench/bench_report.py [--requests 1000000] [--dir runs/bench-report] [--repeat 3]

The directory is kept (building it takes a while) and reused when it already holds
the same number of requests. The figures go to stdout, with the CPU model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cputax.records import JsonlWriter, RequestRecord
from cputax.rundir import RunDir
from cputax.util import cpu_model

MS = 1_000_000
SCENARIOS = [  # name, concurrency, context tokens, share of the requests
    ("single_1k", 1, 1_000, 0.05),
    ("conc16_8k", 16, 8_000, 0.25),
    ("conc64_32k", 64, 32_000, 0.30),
    ("conc256_4k", 256, 4_000, 0.35),
    ("single_100k", 1, 100_000, 0.05),
]
FAIL_EVERY = 997  # one request in about a thousand fails, as real runs have some


def build(run: RunDir, requests: int, seed: int = 0) -> None:
    """Write run.json, requests.jsonl, windows.jsonl and the scrapes of a synthetic run."""
    rng = np.random.default_rng(seed)
    scenarios = []
    t = 1_000_000 * MS  # monotonic time: 1000 s after boot
    with JsonlWriter(run.requests) as out, JsonlWriter(run.windows) as windows:
        for name, conc, ctx, share in SCENARIOS:
            n = max(1, int(requests * share))
            scenarios.append(
                {"name": name, "concurrency": conc, "context_tokens": ctx, "batches": -(-n // conc)}
            )
            start = t
            ser = rng.gamma(4, 0.25, n) * MS
            http = rng.gamma(2, 2.0 + ctx / 20_000, n) * MS
            prefill = rng.gamma(3, ctx / 200, n) * MS
            decode = rng.gamma(8, 40, n) * MS
            lag = rng.exponential(0.05, (n, 3)) * MS
            for i in range(n):
                t0 = start + (i // conc) * int(600 * MS) + int(rng.integers(0, MS))
                sent = t0 + int(ser[i])
                headers = sent + int(http[i])
                first = headers + int(prefill[i])
                last = first + int(decode[i])
                r = RequestRecord(
                    scenario=name,
                    index=i,
                    batch=i // conc,
                    t_start=t0,
                    t_sent=sent,
                    target_prompt_tokens=ctx,
                    build_s=float(ser[i]) / 4e9,
                )
                if i % FAIL_EVERY == FAIL_EVERY - 1:
                    r.status, r.error, r.t_end = (
                        400,
                        "HTTP 400: This model's maximum context length is exceeded",
                        headers,
                    )
                else:
                    r.ok, r.status = True, 200
                    r.t_headers_kernel, r.t_first_token_kernel, r.t_last_token_kernel = (
                        headers,
                        first,
                        last,
                    )
                    r.t_headers, r.t_first_data = headers + int(lag[i, 0]), first + int(lag[i, 1])
                    r.t_first_token, r.t_last_token = r.t_first_data, last + int(lag[i, 2])
                    r.t_first_data_kernel = first
                    r.t_end = r.t_last_token + 200_000
                    r.prompt_tokens, r.output_tokens, r.output_tokens_source = (
                        ctx + int(rng.integers(-2, 3)),
                        128,
                        "usage",
                    )
                    r.chunks, r.parse_s = 130, 130 * 6e-6
                out.write(r)
            t = start + (-(-n // conc)) * int(600 * MS) + 2 * MS
            windows.write({"scenario": name, "start_ns": start, "end_ns": t, "sent": n})
    run.write_info(
        {
            "endpoint": "http://127.0.0.1:8000",
            "model": "synthetic",
            "api": "chat",
            "profile": "bench_report (synthetic)",
            "prompt_counter": "synthetic",
            "host": {"cpus": os.cpu_count()},
            "server_metrics": False,
            "scenarios": scenarios,
        }
    )


def _count_lines(path: Path) -> int:
    with path.open("rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))


def time_report(run: RunDir) -> tuple[float, float]:
    """One `cputax report` in a child process: wall seconds and peak RSS in MiB."""
    code = (
        "import resource, sys; from cputax.cli import main; rc = main(['report', sys.argv[1]]);"
        " print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)"
    )
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(run.path)], capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(
            f"bench_report: cputax report failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return wall, float(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=1_000_000,
        help="requests in the run directory (default 1000000)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("runs/bench-report"),
        help="where to build it (kept, reused)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="report runs to time (default 3)")
    args = parser.parse_args()
    run = RunDir(args.dir)
    expected = sum(max(1, int(args.requests * s[3])) for s in SCENARIOS)
    if not (run.requests.exists() and _count_lines(run.requests) == expected):
        if run.requests.exists():
            run.requests.unlink()
            run.windows.unlink(missing_ok=True)
        run.path.mkdir(parents=True, exist_ok=True)
        print(f"building {run.path} with {expected} requests ...", flush=True)
        t = time.perf_counter()
        build(run, args.requests)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    size = run.requests.stat().st_size / 2**20
    print(
        f"cputax report on {expected} requests ({size:.0f} MiB of requests.jsonl), "
        f"CPU: {cpu_model() or 'unknown'}, "
        f"{os.cpu_count()} CPUs"
    )
    runs = [time_report(run) for _ in range(args.repeat)]
    for k, (wall, rss) in enumerate(runs, 1):
        print(f"  run {k}: {wall:.2f} s wall, peak RSS {rss:.0f} MiB")
    walls = sorted(w for w, _ in runs)
    print(f"median {walls[len(walls) // 2]:.2f} s, max RSS {max(r for _, r in runs):.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
