"""Prefix-cache keys for a 100k-token prompt, the way servers really compute them.

vLLM hashes each full 16-token block, chained: block i's key is
`hash_fn((key[i-1], tuple(block_ids), extra_keys))`, the first block chained to
a seed hash (NONE_HASH). `--prefix-caching-hash-algo` picks hash_fn:
sha256 (pickle the tuple, SHA-256), sha256_cbor (canonical CBOR, SHA-256),
xxhash / xxhash_cbor (xxh3_128 over the same bytes). blake3 over the pickled
bytes and Python's builtin hash() of the tuple (vLLM v0's and LMCache's
"builtin") are here for comparison. LMCache's classic chunk keys are SHA-256
over (previous key's hex digest, the 256 token ids as int64 bytes), last partial
chunk included. `sha256_buffer` is what the study timed: one SHA-256 over one
ready-made buffer of every token id (int64), which no server does; turning the
Python list into that buffer would cost more than the hash and is left out.
"""

from __future__ import annotations

import hashlib
import pickle
from array import array
from collections.abc import Callable
from functools import partial
from typing import Any

import blake3
import cbor2
import xxhash

from cputax.micro.harness import Case, Prepared, Report
from cputax.micro.inputs import Inputs

N_TOKENS = 100000
BLOCK_SIZE = 16
LMCACHE_CHUNK = 256
# vLLM seeds the chain with hash_fn(PYTHONHASHSEED), or random bytes when unset.
SEED = "0"


def _pickled(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _cbor(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


HASH_FNS: dict[str, Callable[[Any], Any]] = {
    "sha256": lambda obj: hashlib.sha256(_pickled(obj)).digest(),
    "sha256_cbor": lambda obj: hashlib.sha256(_cbor(obj)).digest(),
    "xxhash": lambda obj: xxhash.xxh3_128_digest(_pickled(obj)),
    "xxhash_cbor": lambda obj: xxhash.xxh3_128_digest(_cbor(obj)),
    "blake3": lambda obj: blake3.blake3(_pickled(obj)).digest(),
    "builtin": hash,
}


def block_hashes(
    ids: list[int], hash_fn: Callable[[Any], Any], block_size: int = BLOCK_SIZE
) -> list[Any]:
    """vLLM's chained per-block keys (full blocks only; no extra keys: no LoRA, images, salt)."""
    parent = hash_fn(SEED)
    keys = []
    for start in range(0, len(ids) - block_size + 1, block_size):
        parent = hash_fn((parent, tuple(ids[start : start + block_size]), None))
        keys.append(parent)
    return keys


def lmcache_chunk_keys(ids: list[int], chunk: int = LMCACHE_CHUNK) -> list[str]:
    """LMCache's chained chunk keys: SHA-256 over the previous hex key and the chunk's int64 ids."""
    prefix = ""
    keys = []
    for start in range(0, len(ids), chunk):
        hasher = hashlib.sha256(prefix.encode("ascii"))
        hasher.update(array("q", ids[start : start + chunk]))
        prefix = hasher.hexdigest()
        keys.append(prefix)
    return keys


def sha256_buffer(buffer: bytes) -> bytes:
    return hashlib.sha256(buffer).digest()


def _ids(extra: tuple[Any, ...], inputs: Inputs) -> Prepared:
    ids = inputs.corpus(N_TOKENS).ids
    return Prepared((ids, *extra), {"input_tokens": len(ids)})


def _buffer(inputs: Inputs) -> Prepared:
    ids = inputs.corpus(N_TOKENS).ids
    return Prepared((array("q", ids).tobytes(),), {"input_tokens": len(ids)})


def cases() -> list[Case]:
    report = Report("ms/request")
    out = [
        Case(f"hash.{algo}[{N_TOKENS}]", block_hashes, partial(_ids, (fn,)), report)
        for algo, fn in HASH_FNS.items()
    ]
    out.append(
        Case(f"hash.lmcache_sha256[{N_TOKENS}]", lmcache_chunk_keys, partial(_ids, ()), report)
    )
    out.append(Case(f"hash.sha256_buffer[{N_TOKENS}]", sha256_buffer, _buffer, report))
    return out
