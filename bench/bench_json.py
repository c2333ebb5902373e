"""pyperf suite "json" (workloads in cputax.micro.payloads).

python bench/bench_json.py --fast -o json.json [--tokenizer PATH]
"""

from cputax.micro.harness import run_suite

if __name__ == "__main__":
    run_suite("json")
