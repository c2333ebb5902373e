"""`cputax replay`: agent traces as user sessions against a server, decomposed like `cputax run`.

The run directory has the files of `cputax run` (the whole replay is one scenario,
"replay", so `cputax report DIR` rebuilds it), plus in run.json what was replayed
and in summary.json / report.md the agentic metrics.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from cputax.client.loadgen import Barrier, Share, Window
from cputax.client.sessions import SCENARIO, Pacing, Replay
from cputax.client.stream import StreamingClient
from cputax.errors import CputaxError
from cputax.records import JsonlWriter, RequestRecord
from cputax.rundir import RunDir
from cputax.session import (
    Job,
    RunOptions,
    Session,
    api_key,
    drive,
    exit_status,
    measured,
    recording,
    shard_fields,
)
from cputax.text.tokenizer import LoadedTokenizer, load_tokenizer
from cputax.workload.prompts import ReplayPrompts
from cputax.workload.traces import Conversation, load_conversations, trace_hit_rate, trim

__all__ = ["ReplayOptions", "replay"]


@dataclass
class ReplayOptions:
    paths: list[Path]
    run: RunOptions = field(default_factory=RunOptions)  # endpoint, model, out, tokenizer, api...
    users: int | None = None  # sessions at once (default: every conversation at once)
    time_scale: float = 1.0
    max_context: int | None = None
    limit_requests: int | None = None  # per conversation, in trace time
    max_output: int | None = None  # cap on each request's output tokens


def _check(opts: ReplayOptions) -> None:
    for name, value in (
        ("--users", opts.users),
        ("--max-context", opts.max_context),
        ("--limit-requests", opts.limit_requests),
        ("--max-output", opts.max_output),
    ):
        if value is not None and value < 1:
            raise CputaxError(f"{name} must be a positive integer, got {value}")
    if opts.time_scale < 0:
        raise CputaxError(f"--time-scale must be >= 0, got {opts.time_scale:g}")


def _conversation_info(conv: Conversation, own_rate: float | None, in_tokens: int) -> dict:
    return {
        "id": conv.id,
        "source": conv.source,
        "requests": conv.count_requests(),
        "subagents": conv.count_subagents(),
        "skipped_over_context": conv.skipped,
        "dropped_by_limit": conv.dropped,
        "trace_hit_rate": own_rate,
        "in_tokens": in_tokens,
    }


def replay(opts: ReplayOptions) -> int:
    _check(opts)
    console = Console(stderr=True)
    key = api_key(opts.run.api_key_env)
    tokenizer = load_tokenizer(opts.run.tokenizer)
    loaded, errors = load_conversations(opts.paths, tokenizer)
    for error in errors:
        console.print(f"[yellow]not replayed: {error}[/]")
    conversations, described = [], []
    for conv in loaded:
        own_rate = trace_hit_rate(conv)  # the file's own, before trimming
        in_tokens = sum(r.in_tokens for _, _, r in conv.timeline())
        trim(conv, opts.max_context, opts.limit_requests)
        described.append(_conversation_info(conv, own_rate, in_tokens))
        if conv.count_requests():
            conversations.append(conv)
        else:
            console.print(
                f"[yellow]{conv.source}: no request left under --max-context {opts.max_context}[/]"
            )
    if not conversations:
        raise CputaxError("nothing to replay" + (f": {errors[0]}" if errors else ""))
    planned = sum(c.count_requests() for c in conversations)
    users = min(opts.users or len(conversations), len(conversations))
    contexts = [r.in_tokens for c in conversations for _, _, r in c.timeline()]
    out = RunDir.create(opts.run.out)
    console.print(
        f"run directory: {out}; {len(conversations)} conversations, {planned} requests, "
        f"{sum(c.count_subagents() for c in conversations)} sub-agents, {users} users at once"
    )
    info = {
        "profile": "replay of " + ", ".join(map(str, opts.paths)),
        "scenarios": [
            {
                "name": SCENARIO,
                "kind": "replay",
                "concurrency": users,
                "context_tokens": round(sum(contexts) / len(contexts)),
                "planned_requests": planned,
            }
        ],
        "replay": {
            "inputs": [str(p) for p in opts.paths],
            "users": users,
            "time_scale": opts.time_scale,
            "max_context": opts.max_context,
            "limit_requests": opts.limit_requests,
            "max_output": opts.max_output,
            "trace_errors": errors,
            "conversations": described,
            "block_sizes": sorted({c.block_size for c in conversations}),
        },
    }

    async def body(session: Session) -> None:
        await _replay(session, opts, tokenizer, conversations, users, planned)

    agents = sum(1 + c.count_subagents() for c in conversations)
    return exit_status(
        drive(
            opts.run,
            Job(
                run=out,
                info=info,
                body=body,
                tokenizer=tokenizer,
                api_key=key,
                max_connections=max(64, 2 * agents),
            ),
        )
    )


async def _replay(
    session: Session,
    opts: ReplayOptions,
    tokenizer: LoadedTokenizer,
    conversations: list[Conversation],
    users: int,
    planned: int,
) -> None:
    endpoint = session.endpoint
    prompts = ReplayPrompts(
        tokenizer,
        endpoint.model,
        api=opts.run.api,
        ignore_eos=endpoint.ignore_eos,
        max_output=opts.max_output,
        seed=opts.run.seed,
        tool_mode=endpoint.tool_mode,
    )
    session.console.print(f"building the prompt text of {planned} requests ...")
    started = time.perf_counter()
    await prompts.prepare(endpoint.count, conversations)
    prepare_s = time.perf_counter() - started
    sizes = {c.block_size for c in conversations}
    if prompts.server_block_tokens is not None and prompts.server_block_tokens not in sizes:
        session.console.print(
            f"[yellow]the server counts a {min(sizes)}-token block as "
            f"{prompts.server_block_tokens} "
            "tokens: pass --tokenizer with the served model's tokenizer for exact sizes[/]"
        )
    replayed = session.run.info()["replay"]
    session.run.update_info(
        replay={
            **replayed,
            "prepare_s": prepare_s,
            "blocks": prompts.blocks_made,
            "template_tokens": prompts.overhead,
            "server_block_tokens": prompts.server_block_tokens,
        }
    )
    session.console.print(f"{prompts.blocks_made} blocks made in {prepare_s:.1f} s; replaying")
    pacing = Pacing(users=users, time_scale=opts.time_scale)
    procs = min(session.procs_for(users), users, len(conversations))
    if procs > 1 and any(c.scope == "global" for c in conversations):
        session.console.print(
            "[yellow]the trace shares hash ids across conversations: with several load "
            "processes, each counts the ideal cache over its own conversations[/]"
        )

    def work(
        client: StreamingClient,
        share: Share,
        start_ns: int,
        on_record: Callable[[RequestRecord], None],
        _barrier: Barrier,
    ) -> Awaitable[Window]:
        return Replay(client, prompts, pacing, on_record, endpoint.local_count).run(
            conversations, share, start_ns
        )

    with JsonlWriter(session.run.requests) as records, JsonlWriter(session.run.windows) as windows:
        async with measured(session, SCENARIO):
            with recording(records, SCENARIO, planned, session.console) as recorder:
                window = await session.load(
                    procs,
                    work,
                    recorder,
                    lambda: Replay(
                        session.client, prompts, pacing, recorder, endpoint.local_count
                    ).run(conversations),
                )
        windows.write(
            {
                "scenario": SCENARIO,
                "start_ns": window.start_ns,
                "end_ns": window.end_ns,
                "sent": window.sent,
                **shard_fields(window),
            }
        )
        for line in getattr(window, "failures", []):
            session.console.print(f"[red]{SCENARIO}: {line}[/]")
