"""Benchmark inputs, built once and shared by every pyperf worker of a run.

pyperf re-runs the suite script in a fresh process for every batch of values, so
an input built in memory only lives for one worker. A 100k-token corpus or agent
conversation takes a second or more to build and the tokenizer half a second to
load, which would dominate a fast run. `cputax micro` therefore hands every
worker the same `--input-cache` directory: the first worker that needs an input
builds and pickles it, the others read it (and skip loading the tokenizer when
their step does not need it). Without a cache directory everything is simply
built in the worker, deterministically, so results do not depend on the cache.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cputax.text.conversation import Message, agent_conversation, agent_tools, prompt_tokens
from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import LoadedTokenizer, load_tokenizer

T = TypeVar("T")

# The model name put in requests and stream chunks; only its length matters.
MODEL = "Qwen/Qwen3-Coder-30B-A3B-Instruct"


@dataclass(frozen=True)
class Corpus:
    """Agent-shaped text and its token ids (no special tokens)."""

    text: str
    ids: list[int]


@dataclass(frozen=True)
class Conversation:
    """An agent conversation, its tool schemas and its rendered prompt length."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None
    tokens: int


class Inputs:
    """Lazy, memoized builders for one tokenizer; see the module docstring."""

    def __init__(self, tokenizer_spec: str | None = None, cache_dir: Path | None = None):
        self.tokenizer_spec = tokenizer_spec
        self.cache_dir = cache_dir
        self._memo: dict[str, Any] = {}
        # Keys carry the tokenizer so one cache directory can never mix two.
        self._key_prefix = hashlib.sha1(repr(tokenizer_spec).encode()).hexdigest()[:10]

    @functools.cached_property
    def tokenizer(self) -> LoadedTokenizer:
        return load_tokenizer(self.tokenizer_spec)

    def memo(self, key: str, build: Callable[[], T]) -> T:
        """`build()` once per process, and once per run when a cache directory is set."""
        if key in self._memo:
            return self._memo[key]
        path = self.cache_dir / f"{self._key_prefix}-{key}.pickle" if self.cache_dir else None
        if path is not None and path.is_file():
            value = pickle.loads(path.read_bytes())
        else:
            value = build()
            if path is not None:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
                os.replace(tmp, path)
        self._memo[key] = value
        return value

    def tokenizer_metadata(self) -> dict[str, str | int]:
        """What every benchmark records about the tokenizer (cached: loading it is slow)."""

        def build() -> dict[str, str | int]:
            tok = self.tokenizer
            return {
                "cputax_tokenizer": tok.name,
                "cputax_tokenizer_source": tok.source,
                "cputax_vocab_size": tok.vocab_size,
            }

        return self.memo("tokenizer", build)

    def corpus(self, n_tokens: int, seed: int = 0) -> Corpus:
        def build() -> Corpus:
            text = make_corpus(n_tokens, self.tokenizer, seed=seed)
            ids = self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
            return Corpus(text, ids)

        return self.memo(f"corpus-{n_tokens}-{seed}", build)

    def conversation(self, n_tokens: int, n_tools: int, seed: int = 0) -> Conversation:
        """A conversation rendered to about `n_tokens`, with the first `n_tools` tool schemas."""

        def build() -> Conversation:
            tools = agent_tools(seed)[:n_tools] or None
            messages = agent_conversation(n_tokens, self.tokenizer, seed=seed, tools=tools)
            return Conversation(messages, tools, prompt_tokens(messages, tools, self.tokenizer))

        return self.memo(f"conversation-{n_tokens}-{n_tools}-{seed}", build)
