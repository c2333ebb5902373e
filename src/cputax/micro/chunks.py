"""Client-side SSE parsing of a streamed chat completion shaped like vLLM's.

- chunk_<lib>[shape]: one `data: {...}\\n\\n` event, split into lines and
  JSON-decoded, for each chunk shape vLLM sends: the role-only first delta, a
  content delta, a tool-call argument delta, and the final usage chunk.
- stream_<lib>[1024]: a whole response of 1,024 chunks (role, prose, one tool
  call streamed as argument deltas, finish, usage, [DONE]) delivered as the
  socket hands it over: reads of 1,448 B (one TCP segment) to 16 KiB that cut
  events anywhere, reassembled, parsed and accumulated into content plus the
  tool call's name and arguments, as an agent client must.
Delta texts are real token strings of agent-shaped text, so escapes and lengths
are realistic.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from functools import partial
from typing import Any

import orjson

from cputax.micro.harness import Case, Prepared, Report
from cputax.micro.inputs import MODEL, Inputs

Loads = Callable[[bytes], Any]
LOADS: dict[str, Loads] = {"stdlib": json.loads, "orjson": orjson.loads}
SHAPES = ("role", "content", "tool_args", "usage")
STREAM_CHUNKS = 1024
CONTENT_CHUNKS = 160  # prose before the tool call; the rest of the stream is its arguments
PROMPT_TOKENS = 32000
COMPLETION_ID = "chatcmpl-3f1c2a9e8b7d4c6f9a0e1b2c3d4e5f60"
CALL_ID = "chatcmpl-tool-9d8c7b6a5f4e3d2c1b0a"
CREATED = 1767225600
DONE = b"data: [DONE]\n\n"
# Sizes of one socket read, in bytes: one TCP segment up to a 16 KiB buffer.
READ_MIN, READ_MAX = 1448, 16384


def event(
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
) -> bytes:
    """One SSE event as vLLM writes it (pydantic's compact JSON; choices empty on the usage
    chunk)."""
    chunk: dict[str, Any] = {
        "id": COMPLETION_ID,
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [],
    }
    if delta is not None:
        chunk["choices"].append(
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        )
    if usage is not None:
        chunk["usage"] = usage
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def token_pieces(text: str, offsets: list[tuple[int, int]]) -> list[str]:
    """`text` cut at token ends: the deltas a server streams, joining back to `text` exactly."""
    pieces, start = [], 0
    for _, end in offsets:
        if end > start:
            pieces.append(text[start:end])
            start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def stream_events(prose: list[str], arguments: list[str], tool_name: str) -> list[bytes]:
    """Every event of one streamed response that ends in a tool call."""
    events = [event({"role": "assistant", "content": ""})]
    events += [event({"content": piece}) for piece in prose]
    events.append(
        event(
            {
                "tool_calls": [
                    {
                        "id": CALL_ID,
                        "type": "function",
                        "index": 0,
                        "function": {"name": tool_name, "arguments": ""},
                    }
                ]
            }
        )
    )
    events += [
        event({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for piece in arguments
    ]
    events.append(event({}, finish_reason="tool_calls"))
    n_out = len(prose) + len(arguments)
    events.append(
        event(
            None,
            usage={
                "prompt_tokens": PROMPT_TOKENS,
                "total_tokens": PROMPT_TOKENS + n_out,
                "completion_tokens": n_out,
            },
        )
    )
    return events


def socket_reads(data: bytes, seed: int = 0) -> list[bytes]:
    """`data` cut into reads of READ_MIN..READ_MAX bytes, deterministically."""
    rng = random.Random(seed)
    reads, pos = [], 0
    while pos < len(data):
        size = rng.randint(READ_MIN, READ_MAX)
        reads.append(data[pos : pos + size])
        pos += size
    return reads


def parse_event(raw: bytes, loads: Loads) -> Any:
    """Parse one event: split lines, keep the `data:` payload, decode it (None for [DONE])."""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:]
            return None if payload == b"[DONE]" else loads(payload)
    return None


def consume_stream(reads: list[bytes], loads: Loads) -> dict[str, Any]:
    """Reassemble events across reads and accumulate the message, tool calls and usage."""
    buffer = b""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    usage = None
    for data in reads:
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for raw in events:
            chunk = parse_event(raw, loads)
            if chunk is None:
                continue
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                delta = choice["delta"]
                if delta.get("content"):
                    content.append(delta["content"])
                for call in delta.get("tool_calls", ()):
                    slot = calls.setdefault(
                        call["index"], {"id": None, "name": None, "arguments": []}
                    )
                    slot["id"] = call.get("id", slot["id"])
                    function = call.get("function", {})
                    slot["name"] = function.get("name", slot["name"])
                    slot["arguments"].append(function.get("arguments", ""))
    tool_calls = [
        {"id": c["id"], "name": c["name"], "arguments": "".join(c["arguments"])}
        for _, c in sorted(calls.items())
    ]
    return {"content": "".join(content), "tool_calls": tool_calls, "usage": usage}


def stream_parts(inputs: Inputs) -> tuple[list[str], list[str], str]:
    """Prose deltas, argument deltas and the tool name of the 1,024-chunk stream."""

    def build() -> tuple[list[str], list[str], str]:
        tok = inputs.tokenizer.tokenizer
        prose_text = inputs.corpus(CONTENT_CHUNKS + 64, seed=700).text
        prose = token_pieces(prose_text, tok.encode(prose_text, add_special_tokens=False).offsets)
        n_args = STREAM_CHUNKS - 4 - CONTENT_CHUNKS  # role, tool-call header, finish, usage
        body = inputs.corpus(n_args + 64, seed=701).text
        arguments_text = orjson.dumps({"path": "src/agent/loop.py", "content": body}).decode()
        arguments = token_pieces(
            arguments_text, tok.encode(arguments_text, add_special_tokens=False).offsets
        )
        # Trim to exactly STREAM_CHUNKS events; the arguments then stop mid-string, which
        # the parser does not care about.
        return prose[:CONTENT_CHUNKS], arguments[:n_args], "write_file"

    return inputs.memo("sse-stream-parts", build)


def _chunk(shape: str, loads: Loads, inputs: Inputs) -> Prepared:
    prose, arguments, _ = stream_parts(inputs)
    raw = {
        "role": event({"role": "assistant", "content": ""}),
        "content": event({"content": prose[1]}),
        "tool_args": event({"tool_calls": [{"index": 0, "function": {"arguments": arguments[1]}}]}),
        "usage": event(
            None,
            usage={
                "prompt_tokens": PROMPT_TOKENS,
                "total_tokens": PROMPT_TOKENS + 64,
                "completion_tokens": 64,
            },
        ),
    }[shape]
    return Prepared((raw, loads), {"chunk_bytes": len(raw)})


def _stream(loads: Loads, inputs: Inputs) -> Prepared:
    prose, arguments, name = stream_parts(inputs)
    events = stream_events(prose, arguments, name)
    if len(events) != STREAM_CHUNKS:  # e.g. a tokenizer that cuts the texts into fewer pieces
        raise ValueError(f"built a stream of {len(events)} chunks, not {STREAM_CHUNKS}")
    data = b"".join(events) + DONE
    reads = socket_reads(data)
    meta = {"chunks": len(events), "stream_bytes": len(data), "socket_reads": len(reads)}
    return Prepared((reads, loads), meta)


def cases() -> list[Case]:
    out = [
        Case(
            f"sse.chunk_{lib}[{shape}]",
            parse_event,
            partial(_chunk, shape, loads),
            Report("us/chunk"),
        )
        for shape in SHAPES
        for lib, loads in LOADS.items()
    ]
    out += [
        Case(
            f"sse.stream_{lib}[{STREAM_CHUNKS}]",
            consume_stream,
            partial(_stream, loads),
            Report("us/chunk", STREAM_CHUNKS),
        )
        for lib, loads in LOADS.items()
    ]
    return out
