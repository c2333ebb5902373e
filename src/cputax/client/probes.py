"""What cputax asks a server before it loads it: is it up, which model, who counts tokens,
does it take `ignore_eos`.

Each probe is one small request, asked once and bounded by its own short timeout
(`--probe-timeout`, not the per-request one): a server that hangs on an auxiliary
endpoint costs seconds, not the request timeout per probe. A probe that fails is one
line (`Probes.notes`) and the run goes on without that feature; only a server whose
/v1/models answers nothing stops the run. The answers go into run.json, so a reader
knows how the prompts were sized and what the requests carried.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from cputax.errors import CputaxError
from cputax.records import RequestRecord
from cputax.text.conversation import render_chat
from cputax.text.tokenizer import LoadedTokenizer
from cputax.workload.prompts import CountFn, local_counter

__all__ = [
    "PREFLIGHT_TIMEOUT_S",
    "PROBE_TIMEOUT_S",
    "Probes",
    "accepts_ignore_eos",
    "preflight",
    "probe",
    "server_counter",
    "server_version",
    "tool_mode",
]

# each probe's bound (--probe-timeout): a healthy server answers in milliseconds
PROBE_TIMEOUT_S = 5.0
PREFLIGHT_TIMEOUT_S = PROBE_TIMEOUT_S


def _why(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout_s:g} s (--probe-timeout)"
    return str(exc) if isinstance(exc, CputaxError) else f"{type(exc).__name__}: {exc}"


async def preflight(
    client: Any, endpoint: str, model: str | None, timeout_s: float = PROBE_TIMEOUT_S
) -> str:
    """Fail within `timeout_s` on an unreachable or silent endpoint, or on a model the
    server does not serve (naming the ones it has); pick the model if not given."""
    try:
        status, text = await asyncio.wait_for(client.get_text("/v1/models"), timeout_s)
    except Exception as exc:
        raise CputaxError(
            f"cannot reach {endpoint}/v1/models ({_why(exc, timeout_s)}); "
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
        raise CputaxError(
            f"{endpoint}/v1/models answered HTTP {status} without a model list; pass --model NAME"
        )
    data = models.get("data") if isinstance(models, dict) else None
    cards = data if isinstance(data, list) else []
    ids = [
        m["id"] for m in cards if isinstance(m, dict) and isinstance(m.get("id"), str) and m["id"]
    ]
    if model:
        if ids and model not in ids:
            raise CputaxError(
                f"--model {model}: {endpoint} does not serve it; it serves {', '.join(ids)}"
            )
        return model
    if not ids:
        raise CputaxError(f"{endpoint}/v1/models lists no model; pass --model NAME")
    return ids[0]


def _count_of(status: int, body: Any) -> int | None:
    """/tokenize's count, or None when the answer is not a count (a refusal, a wrong type)."""
    count = body.get("count") if status == 200 and isinstance(body, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


async def server_counter(
    client: Any,
    model: str,
    api: str,
    tokenizer: LoadedTokenizer,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> tuple[CountFn, str]:
    """The server's /tokenize when it answers with a count (vLLM does), else the local tokenizer."""
    try:
        status, body = await asyncio.wait_for(
            client.post_json("/tokenize", {"model": model, "prompt": "hello"}), timeout_s
        )
    except Exception:
        status, body = 0, None
    if _count_of(status, body) is None:
        return local_counter(tokenizer), f"local ({tokenizer.name})"

    async def count(messages: list[dict], tools: list[dict] | None) -> int:
        if api == "chat":
            req: dict[str, Any] = {
                "model": model,
                "messages": messages,
                "add_generation_prompt": True,
            }
            if tools:
                req["tools"] = tools
        else:
            req = {"model": model, "prompt": render_chat(messages, tools)}
        status, answer = await client.post_json("/tokenize", req)
        tokens = _count_of(status, answer)
        if tokens is None:
            raise CputaxError(f"/tokenize answered {status} without a count: {str(answer)[:200]}")
        return tokens

    return count, "server /tokenize"


_PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}},
            "required": ["path"],
        },
    },
}


async def tool_mode(
    client: Any, model: str, api: str, timeout_s: float | None = None
) -> tuple[str, str | None]:
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
            return {
                "model": model,
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [_PROBE_TOOL],
                **extra,
            }

        record = await _send(client, build, timeout_s)
        if record.ok:
            return mode, "; ".join(refused) or None
        if record.status not in (400, 422):  # not a refusal of the request's form: cannot tell
            return "auto", f"probe inconclusive ({mode}: {record.error})"
        refused.append(f"{mode}: {record.error}")
    return "in_prompt", "; ".join(refused)


async def _send(client: Any, build: Any, timeout_s: float | None) -> RequestRecord:
    """One chat probe, its record's error saying so when it got no answer within `timeout_s`."""
    record = RequestRecord(scenario="probe")
    if timeout_s is None:
        return await client.send(record, build)
    try:
        return await asyncio.wait_for(client.send(record, build), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        record.ok, record.error = False, f"no answer within {timeout_s:g} s (--probe-timeout)"
        return record


def _ignore_eos_body(model: str, api: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 1, "ignore_eos": True}
    if api == "chat":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "hi"
    return body


async def accepts_ignore_eos(client: Any, model: str, api: str) -> bool:
    """vLLM and SGLang take `ignore_eos` (fixed output lengths); strict servers answer 400/422."""
    record = await client.send(
        RequestRecord(scenario="probe"), lambda: _ignore_eos_body(model, api)
    )
    return record.status not in (400, 422)


async def server_version(client: Any, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """The server's own version string (vLLM's GET /version), or None when it has none."""
    try:
        status, raw = await asyncio.wait_for(client.get_text("/version"), timeout_s)
    except Exception:
        return None
    if status != 200:
        return None
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    version = answer.get("version") if isinstance(answer, dict) else None
    return str(version) if isinstance(version, (str, int, float)) and version else None


@dataclass
class Probes:
    """What the probes found, and one line per probe that failed (`notes`)."""

    model: str
    count: CountFn
    counter_name: str
    has_metrics: bool
    ignore_eos: bool
    tools: str
    refused: str | None
    version: str | None
    notes: list[str] = field(default_factory=list)

    def ignore_eos_words(self) -> str:
        """How the console says it: never "sent" when the probe could not tell."""
        if self.ignore_eos:
            return "sent"
        failed = next((n for n in self.notes if n.startswith("ignore_eos")), None)
        return f"not sent ({failed})" if failed else "refused by the server: output may stop early"


async def probe(
    client: Any,
    endpoint: str,
    model: str | None,
    api: str,
    tokenizer: LoadedTokenizer,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Probes:
    """Every probe once, each within `timeout_s`. CputaxError only when /v1/models answers
    nothing usable; any other probe that fails is a note and the feature is left out."""
    from cputax.client.scrape import metrics_probe

    model = await preflight(client, endpoint, model, timeout_s)
    notes: list[str] = []
    count, counter_name = await server_counter(client, model, api, tokenizer, timeout_s)
    has_metrics, why = await metrics_probe(client, timeout_s)
    if why:
        notes.append(f"/metrics: {why}; server-side columns left out")
    record = await _send(client, lambda: _ignore_eos_body(model, api), timeout_s)
    ignore_eos = record.ok
    if not record.ok and record.status not in (400, 422):
        notes.append(f"ignore_eos: its probe failed ({record.error})")
    if not record.ok and record.status is None:
        # the chat endpoint gave no answer at all: asked once, not again for the tools
        tools, refused = "auto", f"not probed: {record.error}"
    else:
        tools, refused = await tool_mode(client, model, api, timeout_s)
    version = await server_version(client, timeout_s)
    return Probes(
        model, count, counter_name, has_metrics, ignore_eos, tools, refused, version, notes
    )
