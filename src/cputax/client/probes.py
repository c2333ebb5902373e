"""What cputax asks a server before it loads it: is it up, which model, who counts tokens,
does it take `ignore_eos`.

Each probe is one small request; the answers go into run.json, so a reader knows how
the prompts were sized and what the requests carried.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from cputax.errors import CputaxError
from cputax.records import RequestRecord
from cputax.text.conversation import render_chat
from cputax.text.tokenizer import LoadedTokenizer
from cputax.workload.prompts import CountFn, local_counter

__all__ = ["PREFLIGHT_TIMEOUT_S", "accepts_ignore_eos", "preflight", "server_counter", "server_version", "tool_mode"]

PREFLIGHT_TIMEOUT_S = 10.0


async def preflight(client: Any, endpoint: str, model: str | None) -> str:
    """Fail within seconds on an unreachable endpoint, or on a model the server does not
    serve (naming the ones it has); pick the model if not given."""
    try:
        status, text = await asyncio.wait_for(client.get_text("/v1/models"), PREFLIGHT_TIMEOUT_S)
    except Exception as exc:
        raise CputaxError(
            f"cannot reach {endpoint}/v1/models ({type(exc).__name__}: {exc}); "
            "is the server up and is --endpoint its base URL (e.g. http://127.0.0.1:8000)?"
        ) from exc
    try:
        models = orjson.loads(text) if status < 300 else None
    except orjson.JSONDecodeError:
        models = None
    if models is None:
        # Up, but its listing is broken (transformers serve 5.19 answers 500 without a
        # Hugging Face cache): the model must then be named.
        if model:
            return model
        raise CputaxError(f"{endpoint}/v1/models answered HTTP {status} without a model list; pass --model NAME")
    ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict) and m.get("id")] \
        if isinstance(models, dict) else []
    if model:
        if ids and model not in ids:
            raise CputaxError(f"--model {model}: {endpoint} does not serve it; it serves {', '.join(ids)}")
        return model
    if not ids:
        raise CputaxError(f"{endpoint}/v1/models lists no model; pass --model NAME")
    return ids[0]


async def server_counter(client: Any, model: str, api: str, tokenizer: LoadedTokenizer) -> tuple[CountFn, str]:
    """The server's /tokenize when it answers (vLLM does), else the local tokenizer."""
    try:
        status, body = await client.post_json("/tokenize", {"model": model, "prompt": "hello"})
    except Exception:
        status, body = 0, None
    if status != 200 or not isinstance(body, dict) or "count" not in body:
        return local_counter(tokenizer), f"local ({tokenizer.name})"

    async def count(messages: list[dict], tools: list[dict] | None) -> int:
        if api == "chat":
            req: dict[str, Any] = {"model": model, "messages": messages, "add_generation_prompt": True}
            if tools:
                req["tools"] = tools
        else:
            req = {"model": model, "prompt": render_chat(messages, tools)}
        status, answer = await client.post_json("/tokenize", req)
        if status != 200 or "count" not in answer:
            raise CputaxError(f"/tokenize answered {status}: {str(answer)[:200]}")
        return int(answer["count"])

    return count, "server /tokenize"


_PROBE_TOOL = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


async def tool_mode(client: Any, model: str, api: str) -> tuple[str, str | None]:
    """How this server takes tool definitions (workload.prompts.TOOL_MODES), and the server's
    message when it refused plain `tools`.

    vLLM started without --enable-auto-tool-choice and --tool-call-parser answers 400 to
    `tools` without `tool_choice` ("auto"), and accepts tool_choice "none" (the tools are
    still rendered into the prompt). A server that refuses both gets the definitions in
    the system prompt. /v1/completions has no tools field: cputax renders them itself.
    """
    if api != "chat":
        return "auto", None
    refused: list[str] = []
    for mode, extra in (("auto", {}), ("none", {"tool_choice": "none"})):
        def build(extra: dict[str, Any] = extra) -> dict[str, Any]:
            return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}],
                    "tools": [_PROBE_TOOL], **extra}

        record = await client.send(RequestRecord(scenario="probe"), build)
        if record.ok:
            return mode, "; ".join(refused) or None
        if record.status not in (400, 422):  # not a refusal of the request's form: cannot tell
            return "auto", f"probe inconclusive ({mode}: {record.error})"
        refused.append(f"{mode}: {record.error}")
    return "in_prompt", "; ".join(refused)


async def accepts_ignore_eos(client: Any, model: str, api: str) -> bool:
    """vLLM and SGLang take `ignore_eos` (fixed output lengths); strict servers answer 400/422."""

    def build() -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": 1, "ignore_eos": True}
        if api == "chat":
            body["messages"] = [{"role": "user", "content": "hi"}]
        else:
            body["prompt"] = "hi"
        return body

    record = await client.send(RequestRecord(scenario="probe"), build)
    return record.status not in (400, 422)


async def server_version(client: Any) -> str | None:
    """The server's own version string (vLLM's GET /version), or None when it has none."""
    try:
        status, raw = await client.get_text("/version")
    except Exception:
        return None
    if status != 200:
        return None
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    return str(version) if version else None
