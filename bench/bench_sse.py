"""pyperf suite "sse" (workloads in cputax.micro.chunks).

python bench/bench_sse.py --fast -o sse.json [--tokenizer PATH]
"""

from cputax.micro.harness import run_suite

if __name__ == "__main__":
    run_suite("sse")
