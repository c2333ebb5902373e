"""Prompts of a scenario (ScenarioPrompts) and of a replayed trace (ReplayPrompts), sized
in server tokens.

A scenario's prompts are a shared agent prefix plus a unique suffix.

Every request of a run shares the system prompt and tool definitions (what an
agent deployment's prefix cache really sees); with `users`, a parent and its
sub-agents also share a session prefix. Then each request starts its own part
with unique text, so no two prompts are identical and the chained prefix hashes
diverge there: the server must really prefill the rest (the study sent one
identical prompt, so its "prefill" was a cache hit).

Sizes are counted by the server's own tokenizer (`/tokenize`) when it has one,
else by the local tokenizer; the run reports usage.prompt_tokens beside the target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from cputax.records import RequestRecord
from cputax.text.conversation import Message, agent_tools, render_chat
from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import LoadedTokenizer
from cputax.workload.blocks import TraceText
from cputax.workload.profiles import Scenario
from cputax.workload.traces import Agent, Conversation, TraceRequest, iter_requests

UNIQUE_HEAD_TOKENS = 24
# How a request carries its tool definitions (client.probes.tool_mode finds the server's),
# and how the run's console and report say it: the one definition of the modes.
TOOL_MODES = {
    "auto": "sent as `tools`",
    "none": 'sent with `tool_choice: "none"`: the server refused them as "auto" '
    "(the tools are still rendered into the prompt)",
    "in_prompt": "written into the system prompt as text: the server took no `tools` field",
}
# The unique head's text comes from a pool made in prepare(): making corpus text costs about
# 0.5 ms a piece, and a request's own part must cost nothing on the loop while others stream.
HEAD_POOL = 64
CountFn = Callable[[list[Message], list[dict[str, Any]] | None], Awaitable[int]]


def local_counter(tokenizer: LoadedTokenizer) -> CountFn:
    """Count a chat prompt with the local tokenizer and cputax's template."""

    async def count(messages: list[Message], tools: list[dict[str, Any]] | None) -> int:
        return tokenizer.count(render_chat(messages, tools))

    return count


def tools_text(tools: list[dict[str, Any]]) -> str:
    """Tool definitions as system-prompt text, for a server that takes no `tools` field."""
    return (
        "You can call these tools (OpenAI function format):\n"
        + "\n".join(orjson.dumps(t).decode() for t in tools)
        + "\n\n"
    )


def chat_payload(
    model: str,
    messages: list[Message],
    tools: list[dict[str, Any]] | None,
    max_tokens: int,
    api: str = "chat",
    ignore_eos: bool = False,
    tool_mode: str = "auto",
) -> dict[str, Any]:
    """One streamed request's body: chat messages, or for /v1/completions the rendered prompt.
    In "in_prompt" tool mode the caller has put the tools into the messages already."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if api == "chat":
        body["messages"] = messages
        if tools and tool_mode != "in_prompt":
            body["tools"] = tools
            if tool_mode == "none":
                body["tool_choice"] = "none"
    else:
        body["prompt"] = render_chat(messages, None if tool_mode == "in_prompt" else tools)
    return body


@dataclass
class _Text:
    """A corpus text with token offsets, so any token-length prefix is a cheap slice."""

    text: str
    ends: list[int]

    @classmethod
    def make(cls, n_tokens: int, tokenizer: LoadedTokenizer, seed: int) -> _Text:
        text = make_corpus(max(1, n_tokens), tokenizer, seed=seed)
        offsets = tokenizer.tokenizer.encode(text, add_special_tokens=False).offsets
        return cls(text, [end for _, end in offsets])

    def head(self, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        return self.text[: self.ends[min(n_tokens, len(self.ends)) - 1]]


class ScenarioPrompts:
    """Builds request i's messages (untimed) and payload (timed: the client's serialize)."""

    def __init__(
        self,
        scenario: Scenario,
        tokenizer: LoadedTokenizer,
        model: str,
        api: str = "chat",
        run_seed: int = 0,
        ignore_eos: bool = True,
        tool_mode: str = "auto",
    ):
        if tool_mode not in TOOL_MODES:
            raise ValueError(f"tool_mode must be one of {tuple(TOOL_MODES)}, got {tool_mode!r}")
        self.scenario = scenario
        self.tool_mode = tool_mode
        self.ignore_eos = ignore_eos and scenario.ignore_eos
        self.tokenizer = tokenizer
        self.model = model
        self.api = api
        self.seed = run_seed
        self.system = ""
        self.tools: list[dict[str, Any]] | None = None
        self.user_tokens = 0
        self._body: _Text | None = None
        self._sessions: dict[int, str] = {}
        self._heads: list[str] = []
        # request index -> (session prefix, unique head, body tokens): the prepared store
        self._store: dict[int, tuple[str, str, int]] = {}
        self.built_late = 0  # requests whose part was not in the store (made while others ran)

    # --- preparation (before the scenario's clock starts) -------------------
    async def prepare(self, count: CountFn) -> None:
        """Size the shared prefix and the per-request part against `count` (server or local)."""
        sc = self.scenario
        shared = sc.shared_prefix
        tools = agent_tools(self.seed)
        empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
        base = await count(empty, None)
        # Keep only the tool definitions that fit in 80% of the shared prefix, counted as sent.
        chosen: list[dict[str, Any]] = []
        tools_tokens = 0
        for tool in tools:
            if self.tool_mode == "in_prompt":
                n = (
                    await count(
                        [{"role": "system", "content": tools_text([*chosen, tool])}, empty[1]], None
                    )
                    - base
                )
            else:
                n = await count(empty, [*chosen, tool]) - base
            if n > 0.8 * shared:
                break
            chosen, tools_tokens = [*chosen, tool], n
        self.tools = chosen or None
        system_tokens = max(0, shared - tools_tokens)
        self.system = (
            make_corpus(system_tokens, self.tokenizer, seed=self.seed + 1) if system_tokens else ""
        )
        skeleton = await count(self._messages(""), self.sent_tools)
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, sc.context_tokens - skeleton)
        self._body = _Text.make(self.user_tokens, self.tokenizer, seed=self.seed + 2)
        self._heads = [
            make_corpus(UNIQUE_HEAD_TOKENS, self.tokenizer, seed=self.seed * 131 + 7 + k)
            for k in range(HEAD_POOL)
        ]
        # One correction from a full prompt: joins at the seams can add or merge a token.
        error = await count(self._join(self._parts(0)), self.sent_tools) - sc.context_tokens
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, self.user_tokens - error)

    def correct(self, measured_prompt_tokens: int) -> None:
        """Shift the per-request part by the server's usage count of a warm-up prompt.

        For servers without /tokenize whose template or tokenizer differ from ours.
        """
        error = measured_prompt_tokens - self.scenario.context_tokens
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, self.user_tokens - error)
        self._store.clear()  # sized for the old count

    @property
    def sent_tools(self) -> list[dict[str, Any]] | None:
        """The tools in the request's `tools` field (None when they ride in the system prompt)."""
        return None if self.tool_mode == "in_prompt" else self.tools

    def _messages(self, user: str) -> list[Message]:
        messages: list[Message] = []
        if self.system or self.tools:
            system = self.system
            if self.tools and self.tool_mode == "in_prompt":
                system = tools_text(self.tools) + system
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": user})
        return messages

    def _session_prefix(self, user: int) -> str:
        """A user's conversation so far, shared by the parent and its sub-agents."""
        if user not in self._sessions:
            n = int(self.user_tokens * self.scenario.session_prefix_share)
            self._sessions[user] = make_corpus(
                max(1, n), self.tokenizer, seed=self.seed * 7919 + 101 + user
            )
        return self._sessions[user]

    def session_of(self, index: int) -> tuple[int | None, int | None]:
        """(user, role) of request `index`: role 0 is the parent, 1.. its sub-agents."""
        sc = self.scenario
        if not sc.users:
            return None, None
        per_user = 1 + sc.subagents_per_user
        within = index % sc.concurrency
        return within // per_user, within % per_user

    def _parts(self, index: int) -> tuple[str, str, int]:
        """Request `index`'s own part: (session prefix, unique head, tokens of the body after)."""
        assert self._body is not None and self._heads, "prepare() first"
        tag = hashlib.blake2b(
            f"{self.scenario.name}/{self.seed}/{index}".encode(), digest_size=8
        ).hexdigest()
        head = f"Task {tag}: " + self._heads[int(tag, 16) % len(self._heads)]
        remaining = self.user_tokens - self.tokenizer.count(head) - 1
        user, _role = self.session_of(index)
        prefix = ""
        if user is not None:
            prefix = self._session_prefix(user) + "\n"
            remaining -= self.tokenizer.count(prefix)
        return prefix, head, remaining

    def prebuild(self, indices: Iterable[int]) -> int:
        """Make the own part of every request in `indices` now, before the clock starts, so
        that a request's messages are a join of prepared text (no corpus, no tokenizer on the
        loop while other requests are in flight). Returns how many were made.

        The store keeps the parts, not the joined prompts: for the study matrix (32 streams
        x 100k tokens, 3 batches) joined prompts are 96 x 342 kB = 33 MB, the parts about
        200 bytes each, and the join costs 32 us per 100k-token prompt, a third of its
        JSON encode (docs/invariants.md)."""
        made = 0
        for index in indices:
            if index not in self._store:
                self._store[index] = self._parts(index)
                made += 1
        return made

    def messages(self, index: int) -> list[Message]:
        assert self._body is not None, "prepare() first"
        parts = self._store.get(index)
        if parts is None:
            self.built_late += index >= 0  # warm-up requests (negative) are not measured
            parts = self._parts(index)
        return self._join(parts)

    def _join(self, parts: tuple[str, str, int]) -> list[Message]:
        assert self._body is not None
        prefix, head, remaining = parts
        return self._messages(prefix + head + "\n" + self._body.head(remaining))

    # --- the timed part: what the client does per request --------------------
    def payload(self, messages: list[Message]) -> dict[str, Any]:
        return chat_payload(
            self.model,
            messages,
            self.tools,
            self.scenario.max_tokens,
            self.api,
            self.ignore_eos,
            self.tool_mode,
        )

    def record(self, index: int, batch: int | None) -> RequestRecord:
        user, role = self.session_of(index)
        return RequestRecord(
            scenario=self.scenario.name,
            index=index,
            batch=batch,
            target_prompt_tokens=self.scenario.context_tokens,
            session=None if user is None else f"user{user}",
            subagent=None if not role else f"sub{role}",
        )


# --- replayed traces ---------------------------------------------------------------------------
def _user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


class ReplayPrompts:
    """Messages and payloads of replayed requests: synthesized for traces, as given for JSONL.

    A synthesized prompt is one user message; its text is made before the replay's clock
    starts (`prepare`), so a request's client-side building is a join and a JSON encode.
    """

    def __init__(
        self,
        tokenizer: LoadedTokenizer,
        model: str,
        api: str = "chat",
        ignore_eos: bool = True,
        max_output: int | None = None,
        seed: int = 0,
        tool_mode: str = "auto",
    ):
        self.tokenizer = tokenizer
        self.tool_mode = tool_mode
        self.model = model
        self.api = api
        self.ignore_eos = ignore_eos
        self.max_output = max_output
        self.seed = seed
        self.overhead = 0  # prompt tokens of the template around one user message
        self.server_block_tokens: int | None = None  # a block as the server's tokenizer counts it
        self.corrected = False
        self._texts: dict[int, TraceText] = {}

    def _text(self, block_size: int) -> TraceText:
        if block_size not in self._texts:
            self._texts[block_size] = TraceText(self.tokenizer, block_size, self.seed)
        return self._texts[block_size]

    @property
    def blocks_made(self) -> int:
        return sum(len(t.blocks) for t in self._texts.values())

    async def prepare(self, count: CountFn, conversations: list[Conversation]) -> None:
        """Count the template around a user message and a block as the server does, then
        make the text of every block and tail."""
        synthesized = [
            c for c in conversations if any(r.messages is None for _, _, r in c.timeline())
        ]
        if not synthesized:
            return
        text = self._text(synthesized[0].block_size)
        one, two = (text.blocks.block("probe", i) for i in (0, 1))
        single = await count(_user(one), None)
        self.server_block_tokens = await count(_user(one + two), None) - single
        self.overhead = single - text.blocks.size
        for conv, agent, request in iter_requests(synthesized):
            if request.messages is None:
                self._text(conv.block_size).text(conv, agent, request, self.overhead)

    def correct(self, target: int, measured: int) -> None:
        """Once, from the server's usage count: shift the template estimate (servers without
        /tokenize whose template differs from cputax's)."""
        if not self.corrected:
            self.overhead += measured - target
            self.corrected = True

    def messages(self, conv: Conversation, agent: Agent, request: TraceRequest) -> list[Message]:
        if request.messages is not None:
            if request.tools and self.tool_mode == "in_prompt":
                return [{"role": "system", "content": tools_text(request.tools)}, *request.messages]
            return request.messages
        return _user(self._text(conv.block_size).text(conv, agent, request, self.overhead))

    def max_tokens(self, request: TraceRequest) -> int:
        out = max(1, request.out_tokens)
        return out if self.max_output is None else min(out, self.max_output)

    def payload(self, messages: list[Message], request: TraceRequest) -> dict[str, Any]:
        # A recorded conversation's own tools: sent as the server takes them (in_prompt: left out).
        return chat_payload(
            self.model,
            messages,
            request.tools,
            self.max_tokens(request),
            self.api,
            self.ignore_eos,
            self.tool_mode,
        )
