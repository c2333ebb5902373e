"""The prompt text a trace stands for: one block of agent-shaped text per hash id, exactly
`block_size` tokens alone and in any sequence, and a tail unique to each request.

An id seen before gives the identical text, a new id new text, so the server's prefix
cache sees the hit pattern of the original conversation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from cputax.errors import CputaxError
from cputax.text.corpus import pieces
from cputax.text.tokenizer import LoadedTokenizer
from cputax.workload.traces import Agent, Conversation, TraceRequest

__all__ = ["BlockTexts", "TraceText"]


def _seed(*parts: object) -> int:
    return (
        int.from_bytes(
            hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big"
        )
        >> 1
    )


SEAM_PROBES = ("x)\n", "x")  # another block's last and first characters
SEAM_SAMPLE = 16  # blocks checked in sequence before trusting the construction
CHARS_PER_TOKEN = 8  # more than any agent-shaped text needs per token
PAD = " x"  # one more token where the closing newline merged into the last one


class BlockTexts:
    """Agent-shaped text of exactly `size` tokens per key, the same text for the same key.

    A block starts with a visible character and ends with a newline after a visible
    one: byte-level BPE pre-tokenizers split between a newline and what follows, so no
    merge crosses a seam and a block is `size` tokens alone and in any sequence of
    blocks. Every block is counted alone; the first few are also checked in sequence
    (twice in a row, after another block's end, before another block's start), and if
    one fails every block is.
    """

    ATTEMPTS = 24

    def __init__(self, tokenizer: LoadedTokenizer, size: int, seed: int = 0):
        self.tokenizer = tokenizer
        self.size = size
        self.seed = seed
        self._blocks: dict[tuple[str, int], str] = {}
        self._probe_counts = [self._count(p) for p in SEAM_PROBES]
        self._checked = 0
        self._check_all = False

    def _count(self, text: str) -> int:
        return len(self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)

    def block(self, scope: str, hash_id: int) -> str:
        key = (scope, hash_id)
        text = self._blocks.get(key)
        if text is None:
            text = self._blocks[key] = self.exact(
                self.size, _seed(self.seed, scope, hash_id), seam=True
            )
        return text

    def __len__(self) -> int:
        return len(self._blocks)

    def exact(self, n: int, seed: int, seam: bool = False) -> str:
        """Text of exactly n tokens from the corpus stream `seed`; with `seam`, closed by a
        newline so that it tokenizes the same next to other blocks."""
        for attempt in range(self.ATTEMPTS):
            found = self._cut(pieces(_seed(seed, attempt)), n, seam)
            if found is not None:
                return found
        raise CputaxError(
            f"cannot make {n}-token text blocks that tokenize the same alone and in sequence with "
            f"tokenizer {self.tokenizer.name}; replay needs a byte-level BPE tokenizer "
            "(most served models have one)"
        )

    def _cut(self, stream: Iterator[str], n: int, seam: bool) -> str | None:
        source = next(stream)
        while True:
            head = source[: CHARS_PER_TOKEN * (n + 2)]  # tokenize no more than needed
            ends = [
                end
                for _, end in self.tokenizer.tokenizer.encode(
                    head, add_special_tokens=False
                ).offsets
            ]
            if len(ends) >= n + 2:
                break
            source += "\n" + next(stream)
        # The closing newline usually adds a token (n - 1 first), sometimes merges (n).
        for j in (n - 1, n, n - 2, n + 1) if seam else (n, n - 1, n + 1):
            text = source[: ends[j - 1]].rstrip() if j > 0 else ""
            if not text or text[0].isspace():
                continue
            if not seam:
                if self._count(text) == n:
                    return text
                continue
            got = self._count(text + "\n")
            if got == n - 1:
                text, got = text + PAD, self._count(text + PAD + "\n")
            if got == n and self._seams_hold(text + "\n", n):
                return text + "\n"
        return None

    def _seams_hold(self, text: str, n: int) -> bool:
        if self._checked >= SEAM_SAMPLE and not self._check_all:
            return True
        self._checked += 1
        (end, start), count = SEAM_PROBES, self._count
        ok = (
            count(text + text) == 2 * n
            and count(end + text) == self._probe_counts[0] + n
            and count(text + start) == n + self._probe_counts[1]
        )
        self._check_all = self._check_all or not ok
        return ok


class TraceText:
    """A trace request's prompt text: its blocks' texts in order, then a tail unique to the
    request, so that with the chat template (`overhead` tokens) around it the prompt is `in`
    tokens."""

    def __init__(self, tokenizer: LoadedTokenizer, block_size: int, seed: int = 0):
        self.blocks = BlockTexts(tokenizer, block_size, seed)
        self.tokenizer = tokenizer
        self.seed = seed
        self._tails: dict[tuple[str, str | None, int, int], str] = {}

    def text(self, conv: Conversation, agent: Agent, request: TraceRequest, overhead: int) -> str:
        size = self.blocks.size
        parts = [self.blocks.block(conv.scope, h) for h in request.hash_ids]
        tail = request.in_tokens - overhead - size * len(parts)
        while tail < 0 and parts:  # the template ate into the last block: shorten it
            keep = size + tail
            last = parts.pop()
            if keep > 0:
                ends = [
                    e
                    for _, e in self.tokenizer.tokenizer.encode(
                        last, add_special_tokens=False
                    ).offsets
                ]
                parts.append(last[: ends[keep - 1]])
            tail = min(keep, 0)
        if tail > 0:
            key = (conv.id, agent.id, request.turn, tail)
            if key not in self._tails:
                self._tails[key] = self.blocks.exact(tail, _seed(self.seed, "tail", *key))
            parts.append(self._tails[key])
        return "".join(parts)
