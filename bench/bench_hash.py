"""pyperf suite "hash" (workloads in cputax.micro.hashing).

python bench/bench_hash.py --fast -o hash.json [--tokenizer PATH]
"""

from cputax.micro.harness import run_suite

if __name__ == "__main__":
    run_suite("hash")
