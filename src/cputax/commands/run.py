"""`cputax run`: drive a server through a load profile and decompose every request.

The body of the command: the profile's scenarios in order, each with its prompts sized,
its warm-up and its measured part, through the driver every load command shares
(`cputax.session`). `cputax sweep` and `cputax whatif` call `run_profile` once per
configuration or point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from rich.console import Console

from cputax.records import JsonlWriter, RequestRecord, Results
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
from cputax.workload.profiles import Scenario, load_profile, resolve_profile, select, with_controls
from cputax.workload.prompts import ScenarioPrompts

__all__ = ["run", "run_profile", "run_scenarios", "scenario_dicts"]


def run(opts: RunOptions) -> int:
    return exit_status(run_profile(opts))


def run_profile(opts: RunOptions) -> Results | None:
    """The whole of `cputax run`: the profile's scenarios against the target, into opts.out
    (a new run directory); the Results (None when it never got as far as run.json)."""
    profile = resolve_profile(opts.profile)
    scenarios = select(load_profile(profile), opts.scenarios, profile)
    if opts.pyspy and opts.pyspy.overhead:
        scenarios = with_controls(scenarios)  # each scenario also unsampled: py-spy's overhead
    key = api_key(opts.api_key_env)
    tokenizer = load_tokenizer(opts.tokenizer)
    out = RunDir.create(opts.out)
    Console(stderr=True).print(f"run directory: {out}")
    max_conc = max(
        s.concurrency if s.arrival == "closed" else max(s.concurrency, s.burst_size or 0)
        for s in scenarios
    )
    info = {"profile": str(profile), "scenarios": scenario_dicts(scenarios)}

    async def body(session: Session) -> None:
        await run_scenarios(session, scenarios, tokenizer, opts)

    return drive(
        opts,
        Job(
            run=out,
            info=info,
            body=body,
            tokenizer=tokenizer,
            api_key=key,
            max_connections=max(64, 2 * max_conc),
        ),
    )


async def run_scenarios(
    session: Session, scenarios: list[Scenario], tokenizer: LoadedTokenizer, opts: RunOptions
) -> None:
    """Every scenario in order: prompts sized, warm-up, the measured part."""
    run = session.run
    endpoint = session.endpoint
    with JsonlWriter(run.requests) as records, JsonlWriter(run.windows) as windows:
        for scenario in scenarios:
            prompts = ScenarioPrompts(
                scenario,
                tokenizer,
                endpoint.model,
                api=opts.api,
                run_seed=opts.seed,
                ignore_eos=endpoint.ignore_eos,
                tool_mode=endpoint.tool_mode,
            )
            await _one_scenario(session, prompts, records, windows)


async def _one_scenario(
    session: Session, prompts: ScenarioPrompts, records: JsonlWriter, windows: JsonlWriter
) -> None:
    from cputax.client.loadgen import Barrier, Share, Window, prebuild, run_scenario, warm_up

    scenario = prompts.scenario
    session.console.print(
        f"[bold]{scenario.name}[/]: {scenario.describe()}, "
        f"{scenario.context_tokens} tokens, "
        f"max_tokens {scenario.max_tokens}; building prompts..."
    )
    await prompts.prepare(session.endpoint.count)
    warm = await warm_up(session.client, prompts, scenario.warmup)
    failed = next((r for r in warm if not r.ok), None)
    if failed is not None:
        # The server refuses these requests: measuring them would only count errors.
        session.console.print(
            f"[red]{scenario.name}: skipped, its warm-up request failed: {failed.error}[/]"
        )
        now = time.monotonic_ns()
        windows.write(
            {
                "scenario": scenario.name,
                "start_ns": now,
                "end_ns": now,
                "sent": 0,
                "skipped": f"warm-up request failed: {failed.error}",
            }
        )
        return
    counted = [
        r.prompt_tokens
        for r in warm
        if r.ok and r.prompt_tokens and r.output_tokens_source == "usage"
    ]
    if session.endpoint.local_count and counted:
        prompts.correct(counted[0])  # the server's own count beats our local estimate
    procs = session.procs_for(max(scenario.concurrency, scenario.burst_size or 0))
    prebuild(prompts, prompts.seed, procs)  # every prompt before the clock (and the forks)

    def work(
        client: Any,
        share: Share,
        start_ns: int,
        on_record: Callable[[RequestRecord], None],
        barrier: Barrier,
    ) -> Awaitable[Window]:
        return run_scenario(
            client,
            prompts,
            on_record,
            seed=prompts.seed,
            share=share,
            start_ns=start_ns,
            barrier=barrier,
        )

    started, recorders = time.monotonic_ns(), []
    try:
        async with measured(session, scenario.name):
            with recording(
                records, scenario.name, scenario.planned_requests, session.console
            ) as recorder:
                recorders.append(recorder)
                window = await session.load(
                    procs,
                    work,
                    recorder,
                    lambda: run_scenario(session.client, prompts, recorder, seed=prompts.seed),
                )
    except asyncio.CancelledError:  # Ctrl-C or SIGTERM: the window so far, marked
        windows.write(
            {
                "scenario": scenario.name,
                "start_ns": started,
                "end_ns": time.monotonic_ns(),
                "sent": sum(r.count for r in recorders),
                "user_tokens": prompts.user_tokens,
                "tools": len(prompts.tools or []),
                "interrupted": True,
            }
        )
        raise
    windows.write(
        {
            "scenario": scenario.name,
            "start_ns": window.start_ns,
            "end_ns": window.end_ns,
            "sent": window.sent,
            "user_tokens": prompts.user_tokens,
            "tools": len(prompts.tools or []),
            "prompts_built_late": prompts.built_late,
            **shard_fields(window),
        }
    )
    for line in getattr(window, "failures", []):
        session.console.print(f"[red]{scenario.name}: {line}[/]")


def scenario_dicts(scenarios: list[Scenario]) -> list[dict[str, Any]]:
    """The scenarios as run.json keeps them."""
    return [asdict(s) for s in scenarios]
