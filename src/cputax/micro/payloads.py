"""JSON: the client building a chat-completions request body, and the server parsing it.

The request is what an agent sends on a late turn: system prompt, tool schemas,
tool calls and tool results, streaming with usage. The 1k case carries no tool
schemas: the eight schemas alone render to about 5.8k tokens, so a "1k" request
with them would not be 1k. `input_tokens` records the rendered prompt length.

stdlib `json.dumps` with its defaults is what aiohttp and requests send; orjson
is the fast alternative. Parsing is timed on the bytes that went over the wire
(vLLM itself validates the parsed body with pydantic on top of this).
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import orjson

from cputax.micro.harness import Case, Prepared, Report
from cputax.micro.inputs import MODEL, Inputs
from cputax.text.conversation import Message

# Rendered prompt tokens -> how many of the agent's tool schemas it carries.
SIZES = {1000: 0, 8000: 8, 32000: 8, 100000: 8}
MAX_TOKENS = 64


def chat_request(messages: list[Message], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    if tools:
        request["tools"] = tools
        request["tool_choice"] = "auto"
    return request


def build_stdlib(messages: list[Message], tools: list[dict[str, Any]] | None) -> bytes:
    return json.dumps(chat_request(messages, tools)).encode()


def build_orjson(messages: list[Message], tools: list[dict[str, Any]] | None) -> bytes:
    return orjson.dumps(chat_request(messages, tools))


def parse_stdlib(body: bytes) -> Any:
    return json.loads(body)


def parse_orjson(body: bytes) -> Any:
    return orjson.loads(body)


def _prepare(n_tokens: int, parse: bool, inputs: Inputs) -> Prepared:
    conv = inputs.conversation(n_tokens, n_tools=SIZES[n_tokens])
    body = build_stdlib(conv.messages, conv.tools)
    meta = {
        "input_tokens": conv.tokens,
        "request_bytes": len(body),
        "messages": len(conv.messages),
        "tools": len(conv.tools or ()),
    }
    return Prepared((body,) if parse else (conv.messages, conv.tools), meta)


def cases() -> list[Case]:
    steps = (
        ("build_stdlib", build_stdlib, False),
        ("build_orjson", build_orjson, False),
        ("parse_stdlib", parse_stdlib, True),
        ("parse_orjson", parse_orjson, True),
    )
    return [
        Case(f"json.{label}[{n}]", step, partial(_prepare, n, parse), Report("ms/request"))
        for n in SIZES
        for label, step, parse in steps
    ]
