"""Agent traces to replay: parsing, checking, trimming (their prompt text: workload.blocks).

Two inputs, one shape (a Conversation: a main agent whose steps are requests and
sub-agents, each sub-agent an agent of its own):

- kv-cache-tester traces (JSON, gzipped or not; ../shared/traces): token counts and
  one hash id per `block_size`-token block of each prompt, no text. Equal ids at
  equal positions mean a shared prefix, so the text is synthesized per id: an id seen
  before gives the identical block text, a new id new text, and the server's prefix
  cache sees the hit pattern of the original conversation.
- JSONL of OpenAI message lists, one conversation per line: one request per assistant
  message (the messages before it), its length capping the output.

A file with a missing or bad field fails alone, with one line naming the file, the
request and the field; the other files still replay.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from cputax.errors import CputaxError
from cputax.text.conversation import Message, render_chat
from cputax.text.tokenizer import LoadedTokenizer

TRACE_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
DEFAULT_BLOCK_SIZE = 64
DEFAULT_OUTPUT_TOKENS = 64  # a JSONL conversation that ends on a user or tool message


class TraceError(CputaxError):
    """One trace file is unusable; the message names the file, the request and the field."""


@dataclass
class TraceRequest:
    turn: int  # position among its agent's requests in the file
    t: float  # trace seconds from the agent's start
    in_tokens: int
    out_tokens: int
    hash_ids: list[int]
    think_s: float  # trace seconds between the previous response and this request
    api_s: float | None = None  # how long the original call took
    messages: list[Message] | None = None  # JSONL input: the real prompt
    tools: list[dict[str, Any]] | None = None


@dataclass
class SubAgent:
    t: float  # trace seconds from the parent's start
    delay_s: float  # trace seconds from the parent's previous response (or start) to this start
    agent: Agent


@dataclass
class Agent:
    id: str | None  # None: the main agent
    steps: list[TraceRequest | SubAgent] = field(default_factory=list)

    def requests(self) -> list[TraceRequest]:
        return [s for s in self.steps if isinstance(s, TraceRequest)]

    def subagents(self) -> list[SubAgent]:
        return [s for s in self.steps if isinstance(s, SubAgent)]


@dataclass
class Conversation:
    """One user session: what `cputax replay` runs as one unit."""

    id: str
    source: str  # file name (and line, for JSONL)
    block_size: int
    scope: str  # hash ids are shared within a scope: the conversation, or "global"
    main: Agent
    skipped: int = 0  # requests over --max-context
    dropped: int = 0  # requests past --limit-requests

    def timeline(self) -> list[tuple[float, Agent, TraceRequest]]:
        """Every request with its trace time from the conversation's start, in that order."""
        out: list[tuple[float, Agent, TraceRequest]] = []

        def walk(agent: Agent, start: float) -> None:
            for step in agent.steps:
                if isinstance(step, SubAgent):
                    walk(step.agent, start + step.t)
                else:
                    out.append((start + step.t, agent, step))

        walk(self.main, 0.0)
        out.sort(key=lambda item: item[0])
        return out

    def count_requests(self) -> int:
        return len(self.timeline())

    def count_subagents(self) -> int:
        def walk(agent: Agent) -> int:
            return sum(1 + walk(s.agent) for s in agent.subagents())

        return walk(self.main)


# --- loading ------------------------------------------------------------------------------


def trace_files(path: Path) -> list[Path]:
    """A file, or the trace files of a folder (README, LICENSE and the like are not traces)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(TRACE_SUFFIXES))
        if not files:
            raise CputaxError(
                f"{path}: no trace files ({', '.join(TRACE_SUFFIXES)}) in this folder"
            )
        return files
    if not path.exists():
        raise CputaxError(f"{path}: no such file or folder")
    return [path]


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise TraceError(f"{path.name}: not a readable gzip file ({exc})") from exc
    return raw


def load_conversations(
    paths: list[Path], tokenizer: LoadedTokenizer
) -> tuple[list[Conversation], list[str]]:
    """Every conversation of every file, and one error line per file that could not be used."""
    conversations: list[Conversation] = []
    errors: list[str] = []
    ids: set[str] = set()
    for path in [f for p in paths for f in trace_files(p)]:
        try:
            raw = _read_bytes(path)
            jsonl = path.name.endswith((".jsonl", ".jsonl.gz"))
            found = (
                parse_jsonl(raw, path.name, tokenizer) if jsonl else [parse_trace(raw, path.name)]
            )
        except TraceError as exc:
            errors.append(str(exc))
            continue
        for conv in found:
            base, n = conv.id, 1
            while conv.id in ids:  # two files may carry the same id: sessions stay apart
                n += 1
                conv.id = f"{base}#{n}"
            if conv.scope != "global":
                conv.scope = conv.id
            ids.add(conv.id)
            conversations.append(conv)
    return conversations, errors


class _Where:
    """Where a value sits in a trace file, for the one-line error."""

    def __init__(self, source: str, path: str = ""):
        self.source, self.path = source, path

    def at(self, index: int) -> _Where:
        return _Where(
            self.source, f"{self.path}.requests[{index}]" if self.path else f"requests[{index}]"
        )

    def fail(self, key: str, why: str) -> TraceError:
        where = f"request {self.path}" if self.path else "top level"
        return TraceError(f"{self.source}: {where}: field {key!r}: {why}")


def _number(
    obj: dict[str, Any],
    key: str,
    where: _Where,
    *,
    required: bool = True,
    default: float | None = None,
    integer: bool = False,
    minimum: float = 0,
) -> Any:
    if key not in obj or obj[key] is None:
        if required:
            raise where.fail(key, "missing")
        return default
    value = obj[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise where.fail(key, f"expected {kind} >= {minimum:g}, got {value!r}")
    return value


def parse_trace(raw: bytes, source: str) -> Conversation:
    """A kv-cache-tester trace (see ../shared/traces/kv-cache-tester/README.md)."""
    top = _Where(source)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise TraceError(f"{source}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TraceError(f"{source}: top level: expected a JSON object, got {type(data).__name__}")
    block_size = _number(
        data, "block_size", top, required=False, default=DEFAULT_BLOCK_SIZE, integer=True, minimum=1
    )
    scope = data.get("hash_id_scope", "local")
    conv_id = data.get("id") or source.split(".")[0]
    main = _agent(data, None, top, block_size)
    return Conversation(
        id=str(conv_id),
        source=source,
        block_size=block_size,
        scope="global" if scope == "global" else str(conv_id),
        main=main,
    )


def _agent(obj: dict[str, Any], agent_id: str | None, where: _Where, block_size: int) -> Agent:
    entries = obj.get("requests")
    if not isinstance(entries, list):
        raise where.fail("requests", f"expected a list, got {type(entries).__name__}")
    agent = Agent(agent_id)
    previous: TraceRequest | None = None
    for index, entry in enumerate(entries):
        here = where.at(index)
        if not isinstance(entry, dict):
            raise here.fail("type", f"expected an object, got {type(entry).__name__}")
        t = _number(entry, "t", here)
        if entry.get("type") == "subagent":
            sub_id = str(entry.get("agent_id") or f"{agent_id or 'sub'}.{index}")
            anchor = 0.0 if previous is None else previous.t + (previous.api_s or 0.0)
            agent.steps.append(
                SubAgent(t, max(0.0, t - anchor), _agent(entry, sub_id, here, block_size))
            )
            continue
        request = _request(entry, here, len(agent.requests()), block_size, previous)
        agent.steps.append(request)
        previous = request
    return agent


def _request(
    entry: dict[str, Any], where: _Where, turn: int, block_size: int, previous: TraceRequest | None
) -> TraceRequest:
    in_tokens = _number(entry, "in", where, integer=True, minimum=1)
    out_tokens = _number(entry, "out", where, integer=True)
    hash_ids = entry.get("hash_ids")
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        raise where.fail("hash_ids", f"expected a list of integers, got {str(hash_ids)[:60]}")
    if len(hash_ids) * block_size > in_tokens + block_size - 1:
        raise where.fail(
            "hash_ids",
            f"{len(hash_ids)} blocks of {block_size} tokens do not fit in "
            f"'in' = {in_tokens} tokens",
        )
    t = _number(entry, "t", where)
    api_s = _number(entry, "api_time", where, required=False)
    if "think_time" in entry:
        think = float(_number(entry, "think_time", where))
    elif previous is None:
        think = 0.0
    else:  # older traces: the gap between the previous response (or request) and this one
        think = max(0.0, t - previous.t - (previous.api_s or 0.0))
    return TraceRequest(
        turn=turn,
        t=float(t),
        in_tokens=in_tokens,
        out_tokens=out_tokens,
        hash_ids=hash_ids,
        think_s=think,
        api_s=None if api_s is None else float(api_s),
    )


# --- JSONL of OpenAI messages -----------------------------------------------------------------

ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_jsonl(
    raw: bytes, source: str, tokenizer: LoadedTokenizer, block_size: int = DEFAULT_BLOCK_SIZE
) -> list[Conversation]:
    """One conversation per line: a list of messages, or {"messages": [...], "id", "tools",
    "think_time"}. Block ids come from tokenizing each prompt, so prefix sharing is measured."""
    conversations = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}: line {number}"
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise TraceError(f"{where}: not valid JSON ({exc})") from exc
        if isinstance(obj, list):
            obj = {"messages": obj}
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a list of messages or an object with 'messages'")
        messages = obj.get("messages")
        _check_messages(messages, where)
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise TraceError(f"{where}: field 'tools': expected a list, got {type(tools).__name__}")
        think = _number(obj, "think_time", _Where(where), required=False, default=0.0)
        conv_id = str(obj.get("id") or f"{source.split('.')[0]}:{number}")
        agent = Agent(None)
        chains: dict[tuple[int, tuple[int, ...]], int] = {}
        ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if messages[-1]["role"] != "assistant":
            ends.append(len(messages))
        for end in ends:
            prompt = messages[:end]
            if not any(m["role"] != "assistant" for m in prompt):
                continue  # an assistant message with nothing before it is not a request
            answer = messages[end] if end < len(messages) else None
            ids = tokenizer.tokenizer.encode(
                render_chat(prompt, tools), add_special_tokens=False
            ).ids
            out = _answer_tokens(answer, tokenizer) if answer else DEFAULT_OUTPUT_TOKENS
            agent.steps.append(
                TraceRequest(
                    turn=len(agent.steps),
                    t=0.0,
                    in_tokens=len(ids),
                    out_tokens=out,
                    hash_ids=_chain_ids(ids, block_size, chains),
                    think_s=0.0 if not agent.steps else float(think),
                    messages=prompt,
                    tools=tools,
                )
            )
        if not agent.steps:
            raise TraceError(f"{where}: field 'messages': no user or tool message to answer")
        conversations.append(
            Conversation(conv_id, f"{source}:{number}", block_size, conv_id, agent)
        )
    if not conversations:
        raise TraceError(f"{source}: no conversations (one JSON list of messages per line)")
    return conversations


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise TraceError(f"{where}: field 'messages': expected a non-empty list of messages")
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else m
        if role not in ROLES:
            raise TraceError(
                f"{where}: messages[{i}]: field 'role': expected one of {', '.join(ROLES)}, "
                f"got {role!r}"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TraceError(
                f"{where}: messages[{i}]: field 'content': expected a string or a list of parts"
            )


def _answer_tokens(message: Message, tokenizer: LoadedTokenizer) -> int:
    content = message.get("content")
    text = content if isinstance(content, str) else orjson.dumps(content or "").decode()
    calls = message.get("tool_calls") or []
    text += "".join(orjson.dumps(c).decode() for c in calls)
    return max(1, tokenizer.count(text))


def _chain_ids(
    ids: list[int], block_size: int, chains: dict[tuple[int, tuple[int, ...]], int]
) -> list[int]:
    """One id per full block, equal only when the whole prefix up to that block is equal."""
    out, previous = [], 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        key = (previous, tuple(ids[start : start + block_size]))
        previous = chains.setdefault(key, len(chains) + 1)
        out.append(previous)
    return out


# --- trimming -------------------------------------------------------------------------------


def trim(conv: Conversation, max_context: int | None, limit: int | None) -> Conversation:
    """Skip requests over `max_context` input tokens (a skipped request takes no time), then
    keep the first `limit` requests in trace time; sub-agents left without requests go."""
    timeline = conv.timeline()
    fits = [r for _, _, r in timeline if max_context is None or r.in_tokens <= max_context]
    conv.skipped = len(timeline) - len(fits)
    kept = fits if limit is None else fits[:limit]
    conv.dropped = len(fits) - len(kept)
    keep = {id(r) for r in kept}

    def prune(agent: Agent) -> Agent:
        steps: list[TraceRequest | SubAgent] = []
        for step in agent.steps:
            if isinstance(step, SubAgent):
                sub = prune(step.agent)
                if sub.steps:
                    steps.append(SubAgent(step.t, step.delay_s, sub))
            elif id(step) in keep:
                steps.append(step)
        return Agent(agent.id, steps)

    conv.main = prune(conv.main)
    return conv


def ideal_hits(hash_ids: list[int], seen: set[tuple[int, int]]) -> int:
    """Leading blocks an unbounded prefix cache already holds; then remember these blocks."""
    hits = 0
    for position, block in enumerate(hash_ids):
        if (position, block) not in seen:
            break
        hits += 1
    seen.update(enumerate(hash_ids))
    return hits


def trace_hit_rate(conv: Conversation) -> float | None:
    """The conversation's own prefix-cache hit rate: input tokens in blocks an earlier
    request (in trace time) already had, over all input tokens."""
    seen: set[tuple[int, int]] = set()
    hit = total = 0
    for _, _, r in conv.timeline():
        hit += ideal_hits(r.hash_ids, seen) * conv.block_size
        total += r.in_tokens
    return hit / total if total else None


def iter_requests(
    conversations: list[Conversation],
) -> Iterator[tuple[Conversation, Agent, TraceRequest]]:
    for conv in conversations:
        for _, agent, request in conv.timeline():
            yield conv, agent, request
