"""pyperf suite "detok" (workloads in cputax.micro.detokenization).

python bench/bench_detok.py --fast -o detok.json [--tokenizer PATH]
"""

from cputax.micro.harness import run_suite

if __name__ == "__main__":
    run_suite("detok")
