"""The replay driver: user sessions from agent traces, paced as the trace says.

A session is one conversation. Its agent sends its requests in order, each one its
(scaled) think time after the previous response; a sub-agent starts its (scaled)
trace delay after the parent's response that precedes it in the trace, and runs
beside the parent, which does not wait for it. At most `users` sessions run at
once. Every record carries the session, the agent's turn and the sub-agent id, and
in `extra` what the agentic analysis needs (when the think wait ended, when the
agent started, which parent turn it hangs off, the trace's own numbers).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

from cputax.client.heap import steady_heap
from cputax.client.loadgen import WHOLE, Client, Share, Window
from cputax.records import RequestRecord
from cputax.util import sleep_until
from cputax.workload.prompts import ReplayPrompts
from cputax.workload.traces import Agent, Conversation, SubAgent, TraceRequest, ideal_hits

SCENARIO = "replay"


@dataclass
class Pacing:
    users: int  # sessions at once
    time_scale: float = 1.0  # multiplies think times and sub-agent delays


class Replay:
    def __init__(
        self,
        client: Client,
        prompts: ReplayPrompts,
        pacing: Pacing,
        on_record: Callable[[RequestRecord], None],
        local_count: bool = False,
    ):
        self.client = client
        self.prompts = prompts
        self.pacing = pacing
        self.on_record = on_record
        self.local_count = local_count  # correct the template estimate from the first usage count
        self._index = itertools.count()
        self._share = WHOLE
        self._seen: dict[str, set[tuple[int, int]]] = {}  # scope -> blocks an ideal cache holds

    async def run(
        self, conversations: list[Conversation], share: Share = WHOLE, start_ns: int | None = None
    ) -> Window:
        """Replay the conversations (a load shard: every n-th of them, from the common start,
        with its part of the users; needs share.n <= users)."""
        with steady_heap():  # collected and frozen before the start: see client.heap
            return await self._replay(
                conversations, share, start_ns if start_ns is not None else time.monotonic_ns()
            )

    async def _replay(self, conversations: list[Conversation], share: Share, start: int) -> Window:
        await sleep_until(start)
        conversations = conversations[share.k :: share.n]
        slots = asyncio.Semaphore(max(1, share.part(self.pacing.users)))
        self._share = share

        async def session(conv: Conversation) -> None:
            async with slots:
                await self._agent(conv, conv.main, None, None, time.monotonic_ns())

        await asyncio.gather(*(session(c) for c in conversations))
        return Window(start, time.monotonic_ns(), next(self._index))  # requests this shard sent

    def _scaled_ns(self, seconds: float) -> int:
        return int(seconds * self.pacing.time_scale * 1e9)

    async def _agent(
        self,
        conv: Conversation,
        agent: Agent,
        parent: Agent | None,
        after_turn: int | None,
        start_ns: int,
    ) -> None:
        last_end, last_turn = start_ns, None
        children: list[asyncio.Task] = []
        for step in agent.steps:
            if isinstance(step, SubAgent):
                children.append(
                    asyncio.create_task(self._subagent(conv, step, agent, last_turn, last_end))
                )
                continue
            think_ns = self._scaled_ns(step.think_s)
            await sleep_until(last_end + think_ns)
            context = {
                "parent": None if parent is None else (parent.id or "main"),
                "after_turn": after_turn,
                "agent_start_ns": start_ns,
                "think_s": think_ns / 1e9,
            }
            record = await self._send(conv, agent, step, context)
            last_end, last_turn = record.t_end or time.monotonic_ns(), step.turn
        await asyncio.gather(*children)

    async def _subagent(
        self,
        conv: Conversation,
        sub: SubAgent,
        parent: Agent,
        after_turn: int | None,
        anchor_ns: int,
    ) -> None:
        start = anchor_ns + self._scaled_ns(sub.delay_s)
        await sleep_until(start)
        await self._agent(conv, sub.agent, parent, after_turn, start)

    async def _send(
        self, conv: Conversation, agent: Agent, request: TraceRequest, context: dict
    ) -> RequestRecord:
        ready = time.monotonic_ns()
        messages = self.prompts.messages(conv, agent, request)  # client prompt building
        hits = ideal_hits(request.hash_ids, self._seen.setdefault(conv.scope, set()))
        record = RequestRecord(
            scenario=SCENARIO,
            index=self._share.index(next(self._index)),
            session=conv.id,
            turn=request.turn,
            subagent=agent.id,
            target_prompt_tokens=request.in_tokens,
            extra={
                **context,
                "ready_ns": ready,
                "trace": conv.source,
                "trace_in": request.in_tokens,
                "trace_out": request.out_tokens,
                "max_tokens": self.prompts.max_tokens(request),
                "ideal_hit_tokens": hits * conv.block_size,
            },
        )
        try:
            await self.client.send(record, lambda: self.prompts.payload(messages, request))
        except asyncio.CancelledError:  # interrupted: still a record, with what it received
            record.ok, record.error = False, record.error or "cancelled"
            self.on_record(record)
            raise
        if (
            self.local_count
            and record.ok
            and record.prompt_tokens
            and record.output_tokens_source == "usage"
            and request.messages is None
        ):
            self.prompts.correct(request.in_tokens, record.prompt_tokens)
        self.on_record(record)
        return record
