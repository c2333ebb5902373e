"""`cputax sweep`: the same profile, same prompts, on each server configuration; then the
comparison and what it says about the study's claims.

Each configuration starts the server (the embedded vLLM, or the user's `--serve-cmd`)
with its flags, runs the profile with py-spy and telemetry as `cputax run` does, and
stops it: a normal run directory under the sweep directory. A knob the server does not
know, a value it refuses, or a server that does not come up is one line naming the
configuration (with the tail of its log); the sweep goes on, and sweep.json records
each outcome as it happens, so nothing measured is lost.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cputax.analysis.sweep import analyse_sweep
from cputax.commands.run import run_profile
from cputax.errors import CputaxError
from cputax.report.sweep import summary_lines, write_sweep_report
from cputax.results.sweep import Step, Sweep
from cputax.rundir import SweepDir
from cputax.servers import get
from cputax.session import RunOptions, failures_of
from cputax.targets.embedded import command_table, server_help
from cputax.workload.profiles import resolve_profile
from cputax.workload.sweep import ServerFlags, configurations, parse_help, parse_vary, plan

__all__ = ["SweepOptions", "sweep"]

LOG_LINES = 6  # of a server that did not come up, shown under its one line


@dataclass
class SweepOptions:
    run: RunOptions = field(
        default_factory=RunOptions
    )  # profile, scenarios, tokenizer, py-spy, telemetry
    varies: list[str] = field(default_factory=list)
    repeat: int = 1
    out: Path | None = None
    serve_cmd: str | None = None  # 'vllm serve MODEL --port {port} {args}': the user's own server


def _flags(table: Any, opts: SweepOptions, console: Console) -> ServerFlags | None:
    """The server's --help flags, to check the knobs before starting anything (None: unknown)."""
    if opts.serve_cmd is not None:
        return None
    console.print(f"reading the flags {table.name} takes (its --help)...")
    return parse_help(server_help(table))


_ERROR = re.compile(r"error|invalid|refused|not supported|unrecognized", re.I)


def _one_line(exc: CputaxError) -> tuple[str, list[str]]:
    """What went wrong in one line (with the server's own error line where its log has one),
    and the tail of the log."""
    lines = str(exc).splitlines()
    first = re.sub(r"\s*\(log [^)]*\); last lines:$", "", lines[0])
    tail = [line.strip() for line in lines[1:] if line.strip()]
    said = next((line for line in reversed(tail) if _ERROR.search(line)), None)
    return (f"{first}: {said}" if said else first), tail[-LOG_LINES:]


def sweep(opts: SweepOptions) -> int:
    console = Console(stderr=True)
    if opts.run.endpoint:
        raise CputaxError(
            "cputax sweep starts the server itself for each configuration: drop --endpoint "
            "(use --serve-cmd 'vllm serve ... --port {port} {args}' for your own command)"
        )
    table = get("vllm" if opts.run.target == "auto" else opts.run.target)
    if opts.serve_cmd is not None:
        table = command_table(table, opts.serve_cmd)
    elif table.launch is None:
        raise CputaxError(f"cputax cannot start {table.name} itself: pass --serve-cmd")
    profile = resolve_profile(opts.run.profile)
    flags = _flags(table, opts, console)
    varied = [parse_vary(v, table.presets, flags) for v in opts.varies]
    configs = configurations([knobs for knobs, _ in varied])
    steps = plan(configs, opts.repeat)
    for config in configs:
        config.own_options()  # a bad value of cputax's own knobs: one line before anything starts
    out = SweepDir.create(opts.out)
    notes = {p.flag: p.note for _, p in varied if p is not None and p.note}
    info = Sweep(
        profile=str(profile),
        target=table.name,
        serve_cmd=opts.serve_cmd,
        varies=opts.varies,
        repeat=opts.repeat,
        notes=notes,
        moves={knobs[0].flag: p.moves for knobs, p in varied if p is not None},
        configurations=[c.name for c in configs],
        steps=[
            Step(
                configuration=s.configuration.name,
                repeat=s.repeat,
                folder=s.folder,
                args=list(s.configuration.args()),
            )
            for s in steps
        ],
    )
    out.write_info(info)
    console.print(
        f"sweep directory: {out}; {len(configs)} configurations x {opts.repeat} = "
        f"{len(steps)} runs of {profile.name}"
    )
    for note in dict.fromkeys(notes.values()):
        console.print(f"[yellow]note: {note}[/]")
    for i, (step, record) in enumerate(zip(steps, info.steps, strict=True)):
        name = step.configuration.name
        console.rule(
            f"[{i + 1}/{len(steps)}] {name}"
            + (f" (repeat {step.repeat})" if opts.repeat > 1 else "")
        )
        unknown = [
            k.flag for k in step.configuration.knobs if flags is not None and not flags.knows(k)
        ]
        if unknown:
            record.status = "refused"
            record.message = (
                f"unknown knob --{unknown[0]}: `{table.name} serve --help` does not list it"
            )
            console.print(f"[red]{name}: {record.message}[/]")
        else:
            run_opts = dataclasses.replace(
                opts.run,
                out=out.run(step.folder).path,
                server_args=step.configuration.args(),
                serve_cmd=opts.serve_cmd,
                **step.configuration.own_options(),
            )
            try:
                results = run_profile(run_opts)
            except CputaxError as exc:
                first, tail = _one_line(exc)
                record.status, record.message, record.log_tail = "failed", first, tail
                console.print(f"[red]{name}: {first}[/]")
                for line in tail:
                    console.print(f"    {line}", markup=False)
            else:
                problems = failures_of(results)
                record.status, record.problems = ("errors" if problems else "ok"), problems
        out.write_info(info)
    comparison = analyse_sweep(out)  # kept in sweep.json
    write_sweep_report(out, comparison)
    for line in summary_lines(comparison):
        console.print(line, markup=False)
    console.print(f"wrote {out.report_md} and {out.report_html}")
    bad = [s for s in info.steps if s.status != "ok"]
    return 1 if bad else 0
