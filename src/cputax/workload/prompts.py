"""Prompts of a scenario: a shared agent prefix plus a unique suffix, sized in server tokens.

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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cputax.records import RequestRecord
from cputax.text.conversation import Message, agent_tools, render_chat
from cputax.text.corpus import make_corpus
from cputax.text.tokenizer import LoadedTokenizer
from cputax.workload.profiles import Scenario

UNIQUE_HEAD_TOKENS = 24
CountFn = Callable[[list[Message], list[dict[str, Any]] | None], Awaitable[int]]


def local_counter(tokenizer: LoadedTokenizer) -> CountFn:
    """Count a chat prompt with the local tokenizer and cputax's template."""

    async def count(messages: list[Message], tools: list[dict[str, Any]] | None) -> int:
        return tokenizer.count(render_chat(messages, tools))

    return count


def chat_payload(model: str, messages: list[Message], tools: list[dict[str, Any]] | None,
                 max_tokens: int, api: str = "chat", ignore_eos: bool = False) -> dict[str, Any]:
    """One streamed request's body: chat messages, or for /v1/completions the rendered prompt."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0.0}
    if ignore_eos:
        body["ignore_eos"] = True
    if api == "chat":
        body["messages"] = messages
        if tools:
            body["tools"] = tools
    else:
        body["prompt"] = render_chat(messages, tools)
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

    def __init__(self, scenario: Scenario, tokenizer: LoadedTokenizer, model: str,
                 api: str = "chat", run_seed: int = 0, ignore_eos: bool = True):
        self.scenario = scenario
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

    # --- preparation (before the scenario's clock starts) -------------------
    async def prepare(self, count: CountFn) -> None:
        """Size the shared prefix and the per-request part against `count` (server or local)."""
        sc = self.scenario
        shared = sc.shared_prefix
        tools = agent_tools(self.seed)
        empty = [{"role": "system", "content": ""}, {"role": "user", "content": ""}]
        base = await count(empty, None)
        # Keep only the tool definitions that fit in 80% of the shared prefix.
        chosen: list[dict[str, Any]] = []
        tools_tokens = 0
        for tool in tools:
            n = await count(empty, [*chosen, tool]) - base
            if n > 0.8 * shared:
                break
            chosen, tools_tokens = [*chosen, tool], n
        self.tools = chosen or None
        system_tokens = max(0, shared - tools_tokens)
        self.system = make_corpus(system_tokens, self.tokenizer, seed=self.seed + 1) if system_tokens else ""
        skeleton = await count(self._messages(""), self.tools)
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, sc.context_tokens - skeleton)
        self._body = _Text.make(self.user_tokens, self.tokenizer, seed=self.seed + 2)
        # One correction from a full prompt: joins at the seams can add or merge a token.
        error = await count(self.messages(0), self.tools) - sc.context_tokens
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, self.user_tokens - error)

    def correct(self, measured_prompt_tokens: int) -> None:
        """Shift the per-request part by the server's usage count of a warm-up prompt.

        For servers without /tokenize whose template or tokenizer differ from ours.
        """
        error = measured_prompt_tokens - self.scenario.context_tokens
        self.user_tokens = max(UNIQUE_HEAD_TOKENS + 1, self.user_tokens - error)

    def _messages(self, user: str) -> list[Message]:
        messages: list[Message] = []
        if self.system or self.tools:
            messages.append({"role": "system", "content": self.system})
        messages.append({"role": "user", "content": user})
        return messages

    def _session_prefix(self, user: int) -> str:
        """A user's conversation so far, shared by the parent and its sub-agents."""
        if user not in self._sessions:
            n = int(self.user_tokens * self.scenario.session_prefix_share)
            self._sessions[user] = make_corpus(max(1, n), self.tokenizer, seed=self.seed * 7919 + 101 + user)
        return self._sessions[user]

    def session_of(self, index: int) -> tuple[int | None, int | None]:
        """(user, role) of request `index`: role 0 is the parent, 1.. its sub-agents."""
        sc = self.scenario
        if not sc.users:
            return None, None
        per_user = 1 + sc.subagents_per_user
        within = index % sc.concurrency
        return within // per_user, within % per_user

    def messages(self, index: int) -> list[Message]:
        assert self._body is not None, "prepare() first"
        tag = hashlib.blake2b(f"{self.scenario.name}/{self.seed}/{index}".encode(), digest_size=8).hexdigest()
        head = f"Task {tag}: " + make_corpus(UNIQUE_HEAD_TOKENS, self.tokenizer, seed=int(tag, 16) % (2**31))
        remaining = self.user_tokens - self.tokenizer.count(head) - 1
        user, _role = self.session_of(index)
        prefix = ""
        if user is not None:
            prefix = self._session_prefix(user) + "\n"
            remaining -= self.tokenizer.count(prefix)
        return self._messages(prefix + head + "\n" + self._body.head(remaining))

    # --- the timed part: what the client does per request --------------------
    def payload(self, messages: list[Message]) -> dict[str, Any]:
        return chat_payload(self.model, messages, self.tools, self.scenario.max_tokens, self.api, self.ignore_eos)

    def record(self, index: int, batch: int | None) -> RequestRecord:
        user, role = self.session_of(index)
        return RequestRecord(
            scenario=self.scenario.name, index=index, batch=batch,
            target_prompt_tokens=self.scenario.context_tokens,
            session=None if user is None else f"user{user}",
            subagent=None if not role else f"sub{role}",
        )
