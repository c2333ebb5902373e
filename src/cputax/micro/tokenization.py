"""Tokenization: what vLLM's front end does to every prompt before the engine sees it.

- encode[N]: one prompt of N tokens of agent-shaped text, at the study's eight sizes.
- render[N] / chat_template[N]: the jinja2 chat template alone, then template +
  encode, for a multi-turn agent conversation with tool schemas, tool calls and
  tool results (what a chat request really costs the front end).
- encode_loop / encode_batch[32x8000]: 32 different 8k prompts (the study's
  concurrency-32 case) encoded one after another on one thread, as a front end
  that tokenizes each request on arrival does, against tokenizers' own thread
  pool (`encode_batch`, sized by RAYON_NUM_THREADS, off when
  TOKENIZERS_PARALLELISM=false; both are recorded in the metadata).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from tokenizers import Encoding, Tokenizer

from cputax.micro.harness import Case, Prepared, Report
from cputax.micro.inputs import Inputs
from cputax.text.conversation import Message, render_chat

STUDY_SIZES = (679, 2711, 5423, 10840, 21679, 43359, 67745, 101615)
TEMPLATE_SIZES = (8000, 100000)
BATCH_PROMPTS = 32
BATCH_TOKENS = 8000
BATCH_PARAM = f"{BATCH_PROMPTS}x{BATCH_TOKENS}"


def encode(tokenizer: Tokenizer, text: str) -> Encoding:
    return tokenizer.encode(text, add_special_tokens=False)


def render_and_encode(
    tokenizer: Tokenizer, messages: list[Message], tools: list[dict[str, Any]] | None
) -> Encoding:
    # The template already holds the special tokens, as in vLLM's chat path.
    return tokenizer.encode(render_chat(messages, tools), add_special_tokens=False)


def encode_loop(tokenizer: Tokenizer, texts: list[str]) -> list[Encoding]:
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[Encoding]:
    return tokenizer.encode_batch(texts, add_special_tokens=False)


def _text(n_tokens: int, inputs: Inputs) -> Prepared:
    corpus = inputs.corpus(n_tokens)
    return Prepared((inputs.tokenizer.tokenizer, corpus.text), {"input_tokens": len(corpus.ids)})


def _conversation(n_tokens: int, with_tokenizer: bool, inputs: Inputs) -> Prepared:
    conv = inputs.conversation(n_tokens, n_tools=8)
    args = (conv.messages, conv.tools)
    if with_tokenizer:
        args = (inputs.tokenizer.tokenizer, *args)
    meta = {
        "input_tokens": conv.tokens,
        "messages": len(conv.messages),
        "tools": len(conv.tools or ()),
    }
    return Prepared(args, meta)


def _batch(inputs: Inputs) -> Prepared:
    # Distinct prompts: 32 copies of one prompt would be unlike real traffic.
    corpora = [inputs.corpus(BATCH_TOKENS, seed=100 + i) for i in range(BATCH_PROMPTS)]
    meta = {"input_tokens": sum(len(c.ids) for c in corpora), "prompts": BATCH_PROMPTS}
    return Prepared((inputs.tokenizer.tokenizer, [c.text for c in corpora]), meta)


def cases() -> list[Case]:
    out = [
        Case(f"tokenize.encode[{n}]", encode, partial(_text, n), Report("tokens/s", n))
        for n in STUDY_SIZES
    ]
    for n in TEMPLATE_SIZES:
        out.append(
            Case(
                f"tokenize.render[{n}]",
                render_chat,
                partial(_conversation, n, False),
                Report("tokens/s", n),
            )
        )
        out.append(
            Case(
                f"tokenize.chat_template[{n}]",
                render_and_encode,
                partial(_conversation, n, True),
                Report("tokens/s", n),
            )
        )
    batch = Report("tokens/s", BATCH_PROMPTS * BATCH_TOKENS)
    out.append(Case(f"tokenize.encode_loop[{BATCH_PARAM}]", encode_loop, _batch, batch))
    out.append(Case(f"tokenize.encode_batch[{BATCH_PARAM}]", encode_batch, _batch, batch))
    return out
