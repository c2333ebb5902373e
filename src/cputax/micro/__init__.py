"""Micro-benchmark workloads: every CPU step on a request's path, as pyperf cases.

`bench/*.py` and `cputax micro` run them; `harness` is the pyperf side.
"""

# suite name (benchmark prefix, `cputax micro --suite`) -> its module in cputax.micro
SUITES = {
    "tokenize": "tokenization",
    "json": "payloads",
    "hash": "hashing",
    "sse": "chunks",
    "detok": "detokenization",
}

__all__ = ["SUITES"]
