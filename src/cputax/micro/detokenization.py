"""Streaming detokenization of generated tokens, three ways, plus the priming cost.

- decode_stream[N]: tokenizers' `DecodeStream.step` per token, what vLLM's
  FastIncrementalDetokenizer calls: emits each new piece of text once it is
  valid UTF-8.
- decode_full[N]: decode the whole output so far at every step and diff it,
  the naive incremental way (quadratic in N).
- decode_each[N]: one `decode([id])` per token, what the study timed; cheap
  but wrong for tokens that split a UTF-8 character or need their neighbours.
- first_token_primed[P]: recent vLLM builds the stream with
  `DecodeStream(ids=prompt_token_ids)`; the first step then decodes the whole
  P-token prompt once, a per-request cost on the way to the first token.
Generated ids are agent-shaped text encoded, not random ids.
"""

from __future__ import annotations

from functools import partial

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from cputax.micro.harness import Case, Prepared, Report
from cputax.micro.inputs import Inputs

OUTPUT_SIZES = (128, 1024)
PROMPT_SIZES = (8000, 100000)
OUTPUT_SEED = 500


def decode_stream(tokenizer: Tokenizer, ids: list[int]) -> list[str | None]:
    stream = DecodeStream(skip_special_tokens=True)
    return [stream.step(tokenizer, token) for token in ids]


def decode_full(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    deltas, previous = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        deltas.append(text[len(previous) :])
        previous = text
    return deltas


def decode_each(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([token], skip_special_tokens=True) for token in ids]


def first_token_primed(tokenizer: Tokenizer, prompt: list[int], first: int) -> str | None:
    return DecodeStream(ids=prompt, skip_special_tokens=True).step(tokenizer, first)


def _generated(n_tokens: int, inputs: Inputs) -> Prepared:
    ids = inputs.corpus(n_tokens, seed=OUTPUT_SEED).ids
    return Prepared(
        (inputs.tokenizer.tokenizer, ids), {"input_tokens": len(ids), "output_tokens": len(ids)}
    )


def _primed(n_prompt: int, inputs: Inputs) -> Prepared:
    prompt = inputs.corpus(n_prompt).ids
    first = inputs.corpus(OUTPUT_SIZES[0], seed=OUTPUT_SEED).ids[0]
    return Prepared((inputs.tokenizer.tokenizer, prompt, first), {"input_tokens": len(prompt)})


def cases() -> list[Case]:
    out = [
        Case(f"detok.{step.__name__}[{n}]", step, partial(_generated, n), Report("us/token", n))
        for n in OUTPUT_SIZES
        for step in (decode_stream, decode_full, decode_each)
    ]
    out += [
        Case(
            f"detok.first_token_primed[{p}]",
            first_token_primed,
            partial(_primed, p),
            Report("ms/request"),
        )
        for p in PROMPT_SIZES
    ]
    return out
