"""`cputax run`: drive a server through a load profile and decompose every request."""

from __future__ import annotations

from rich.console import Console

from cputax.rundir import RunDir
from cputax.session import (
    RunOptions,
    Session,
    api_key,
    drive,
    exit_status,
    run_scenarios,
    scenario_dicts,
)
from cputax.text.tokenizer import load_tokenizer
from cputax.workload.profiles import load_profile, resolve_profile, select, with_controls

__all__ = ["run"]


def run(opts: RunOptions) -> int:
    profile = resolve_profile(opts.profile)
    scenarios = select(load_profile(profile), opts.scenarios, profile)
    if opts.pyspy and opts.pyspy.overhead:
        scenarios = with_controls(scenarios)  # each scenario also unsampled: py-spy's overhead
    key = api_key(opts.api_key_env)
    tokenizer = load_tokenizer(opts.tokenizer)
    out = RunDir.create(opts.out)
    Console(stderr=True).print(f"run directory: {out}")
    max_conc = max(s.concurrency if s.arrival == "closed" else max(s.concurrency, s.burst_size or 0) for s in scenarios)
    info = {"profile": str(profile), "scenarios": scenario_dicts(scenarios)}

    async def body(session: Session) -> None:
        await run_scenarios(session, scenarios, tokenizer, opts)

    return exit_status(drive(opts, key, tokenizer, out, info, body, max_connections=max(64, 2 * max_conc)))
