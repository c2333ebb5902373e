"""`cputax corpus --tokens N`: agent-shaped text of exactly N tokens."""

from __future__ import annotations

import sys
from pathlib import Path

from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import load_tokenizer

__all__ = ["corpus"]


def corpus(tokens: int, tokenizer: str | None, seed: int, output: str | None) -> int:
    tok = load_tokenizer(tokenizer)
    text = make_corpus(tokens, tok, seed=seed)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    print(f"{tok.count(text)} tokens ({tok.name}, seed {seed})", file=sys.stderr)
    return 0
