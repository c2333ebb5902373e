"""pyperf suite "tokenize" (workloads in cputax.micro.tokenization).

python bench/bench_tokenize.py --fast -o tokenize.json [--tokenizer PATH]
"""

from cputax.micro.harness import run_suite

if __name__ == "__main__":
    run_suite("tokenize")
