"""Agent conversations: system prompt, tool definitions, tool calls and results.

What a coding agent sends on turn N: a long system prompt, a dozen tool schemas,
then user instructions, assistant tool calls and tool results. Sized to a token
count measured on the rendered prompt (template included), so benchmarks and
load scenarios use the length they claim.
"""

from __future__ import annotations

import functools
import json
import random
from importlib import resources
from typing import Any

import orjson
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cputax.text.corpus import TextGen, make_corpus
from cputax.text.tokenizer import LoadedTokenizer

Message = dict[str, Any]

_TOOL_SPECS = (
    (
        "read_file",
        "Read a file from the workspace and return its contents with line numbers.",
        {"path": "string", "offset": "integer", "limit": "integer"},
    ),
    (
        "write_file",
        "Create or overwrite a file in the workspace with the given contents.",
        {"path": "string", "content": "string"},
    ),
    (
        "edit_file",
        "Replace an exact string in a file with a new string; "
        "fails if the old string is not unique.",
        {"path": "string", "old_string": "string", "new_string": "string"},
    ),
    (
        "run_shell",
        "Run a shell command in the workspace and return stdout, stderr and the exit code.",
        {"command": "string", "timeout_s": "integer"},
    ),
    (
        "grep",
        "Search file contents with a regular expression and return matching lines with paths.",
        {"pattern": "string", "path": "string", "glob": "string"},
    ),
    (
        "list_dir",
        "List the entries of a directory with sizes and modification times.",
        {"path": "string", "depth": "integer"},
    ),
    (
        "run_tests",
        "Run the project's test suite, or a subset selected by expression, and report failures.",
        {"selector": "string", "verbose": "boolean"},
    ),
    (
        "spawn_subagent",
        "Start a sub-agent with its own context on a focused task and return its final report.",
        {"task": "string", "tools": "array"},
    ),
)
TOOL_NAMES = tuple(spec[0] for spec in _TOOL_SPECS)


def agent_tools(seed: int = 0) -> list[dict[str, Any]]:
    """OpenAI-format tool definitions, with the long usage notes real agents carry."""
    gen = TextGen(seed + 7919)
    tools = []
    for name, summary, params in _TOOL_SPECS:
        properties = {
            p: {"type": t, "description": f"The {p.replace('_', ' ')}. {gen.prose()}"}
            for p, t in params.items()
        }
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": name,
                    "description": f"{summary}\n\nUsage notes: {gen.prose()} {gen.prose()}",
                    "parameters": {
                        "type": "object",
                        "properties": properties,
                        "required": [next(iter(params))],
                    },
                },
            }
        )
    return tools


@functools.lru_cache(maxsize=1)
def chat_template() -> str:
    """A Qwen/Hermes-style template with tools and tool calls (also the embedded model's)."""
    return resources.files("cputax.data").joinpath("chat_template.jinja").read_text()


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """transformers' tojson filter (spaced separators), so our counts match its servers'."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    # The same environment transformers' apply_chat_template uses.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    return env.from_string(template)


def render_chat(
    messages: list[Message],
    tools: list[dict[str, Any]] | None = None,
    template: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    return _compiled(template or chat_template()).render(
        messages=text_content(messages), tools=tools, add_generation_prompt=add_generation_prompt
    )


def text_content(messages: list[Message]) -> list[Message]:
    """Messages whose content comes as parts (`[{"type": "text", "text": ...}]`, the OpenAI
    form that guidellm and others send) with it as one string, the text parts joined by
    newlines: what vLLM renders for a text model (its chat_utils, "string" content format)."""
    if all(not isinstance(m.get("content"), list) for m in messages):
        return messages
    return [
        {
            **m,
            "content": "\n".join(
                p.get("text", "")
                for p in m["content"]
                if isinstance(p, dict) and p.get("type") == "text"
            ),
        }
        if isinstance(m.get("content"), list)
        else m
        for m in messages
    ]


def prompt_tokens(
    messages: list[Message], tools: list[dict[str, Any]] | None, tokenizer: LoadedTokenizer
) -> int:
    """Tokens of the rendered prompt: what the server's prompt_tokens should report."""
    return tokenizer.count(render_chat(messages, tools))


def _tool_call(gen: TextGen, call_id: str) -> dict[str, Any]:
    name = gen.r.choice(TOOL_NAMES)
    args = (
        {"path": gen.path()} if gen.r.random() < 0.6 else {"command": f"pytest -q -k {gen.ident()}"}
    )
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(args).decode()},
    }


def agent_conversation(
    n_tokens: int,
    tokenizer: LoadedTokenizer,
    seed: int = 0,
    system_tokens: int | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[Message]:
    """Messages whose rendered prompt (with `tools`) is `n_tokens` long, to within a few tokens.

    Turns alternate user instruction -> assistant tool call -> tool result; the
    last tool result is sized to land on the target. `system_tokens` sizes the
    system prompt (default: an eighth of the budget, capped at 2,000).
    """
    gen = TextGen(seed)
    rng = random.Random(seed)
    if system_tokens is None:
        system_tokens = max(16, min(2000, n_tokens // 8))
    messages: list[Message] = [
        {"role": "system", "content": make_corpus(system_tokens, tokenizer, seed=seed + 1)},
        {"role": "user", "content": gen.prose()},
    ]
    # Estimate as turns are added (tokens of each piece plus template wrapping),
    # then render once to size the last result exactly: two renders in all.
    used = prompt_tokens(messages, tools, tokenizer)
    turn = 0
    while True:
        call_id = f"call_{seed}_{turn}"
        call = {
            "role": "assistant",
            "content": gen.prose() if rng.random() < 0.3 else "",
            "tool_calls": [_tool_call(gen, call_id)],
        }
        messages.append(call)
        messages.append({"role": "tool", "tool_call_id": call_id, "content": ""})
        used += (
            tokenizer.count(call["content"] + call["tool_calls"][0]["function"]["arguments"]) + 40
        )
        result_tokens = rng.randint(200, 3000)
        if n_tokens - used <= result_tokens + 400:
            remaining = n_tokens - prompt_tokens(messages, tools, tokenizer)
            if remaining > 0:
                messages[-1]["content"] = make_corpus(remaining, tokenizer, seed=seed * 1000 + turn)
            return messages
        messages[-1]["content"] = make_corpus(result_tokens, tokenizer, seed=seed * 1000 + turn)
        used += result_tokens + 10
        if rng.random() < 0.4:
            user = gen.prose()
            messages.append({"role": "user", "content": user})
            used += tokenizer.count(user) + 8
        turn += 1
