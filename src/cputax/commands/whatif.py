"""`cputax whatif`: what would making a server component faster buy? Slow it down by known
factors on the real server, measure, extrapolate (analysis.whatif).

One server is started for the whole experiment (the embedded vLLM with the emulated GPU,
or `--serve-cmd`), with the slowdown plugin asked for through its environment. Each point
(a component at a slowdown k, or the unslowed baseline) then runs the same profile against
it as `cputax run --endpoint` does: a normal run directory whose run.json also holds each
component's own and added time over each scenario. Points alternate (baseline, each
component at each k, then the same reversed for the next repeat), so drift hits all alike.
plan.json records each outcome as it happens: nothing measured is lost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from cputax.analysis.whatif import analyse_whatif
from cputax.commands.run import run_profile
from cputax.errors import CputaxError
from cputax.report.whatif import summary_lines, write_whatif_report
from cputax.rundir import WhatIfDir
from cputax.servers import Component, ServerTable, get
from cputax.session import DEFAULT_EMULATION, RunOptions, failures_of
from cputax.targets.embedded import EmbeddedServer, command_table
from cputax.targets.slowdown import SlowdownControl, SlowdownMonitor, check_functions
from cputax.util import cpu_model
from cputax.workload.profiles import load_profile, resolve_profile, select

__all__ = ["WhatIfOptions", "parse_slowdowns", "plan_points", "whatif"]

PLACEBO = "placebo"


@dataclass
class WhatIfOptions:
    run: RunOptions = field(default_factory=RunOptions)  # profile, scenarios, tokenizer, target
    components: list[str] = field(default_factory=list)  # "a" or "a+b" (slowed together)
    slowdowns: tuple[float, ...] = (0.0, 0.5, 1.0)
    repeat: int = 2
    placebo: bool = True
    out: Path | None = None
    serve_cmd: str | None = None
    emulate_gpu: str = DEFAULT_EMULATION  # a preset, a TOML file, or "none"
    gpu_speed: float = 1.0


def parse_slowdowns(text: str) -> tuple[float, ...]:
    """ "0,0.5,1" -> (0.0, 0.5, 1.0); 0 is added (the baseline every fit needs)."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()} | {0.0})
    except ValueError as exc:
        raise CputaxError(f"--slowdowns {text!r}: give factors like 0,0.5,1") from exc
    if any(v < 0 or v > 20 for v in values) or len(values) < 3:
        raise CputaxError(
            f"--slowdowns {text!r}: need at least two factors above 0, each at most 20 "
            "(the back-test predicts k=0 from them)"
        )
    return tuple(values)


def plan_points(
    components: list[str], slowdowns: tuple[float, ...], repeat: int
) -> list[dict[str, Any]]:
    """The order the points run in: a warm-up run (not analysed: the first run after start-up
    is slower), then per repeat the baseline and every (component, k>0), components
    interleaved within each k; every other repeat reversed."""
    points: list[dict[str, Any]] = [
        {
            "component": None,
            "k": 0.0,
            "repeat": -1,
            "folder": "warmup",
            "status": "planned",
            "warmup": True,
        }
    ]
    for r in range(repeat):
        one = [(None, 0.0)] + [(c, k) for k in slowdowns if k > 0 for c in components]
        for component, k in one if r % 2 == 0 else one[::-1]:
            name = "base" if component is None else f"{component}-k{k:g}"
            points.append(
                {
                    "component": component,
                    "k": k,
                    "repeat": r,
                    "folder": f"{name}-r{r}",
                    "status": "planned",
                }
            )
    return points


def _components(
    table: ServerTable, names: list[str], placebo: bool
) -> tuple[list[str], list[Component]]:
    if not table.components:
        raise CputaxError(f"{table.name} names no what-if components (servers/{table.name}.py)")
    if not names:
        raise CputaxError(
            "name at least one --component "
            f"({', '.join(c for c in table.components if c != PLACEBO)})"
        )
    wanted = list(
        dict.fromkeys(names + ([PLACEBO] if placebo and PLACEBO in table.components else []))
    )
    members = list(dict.fromkeys(m for n in wanted for m in n.split("+")))
    check_functions(table, members)
    return wanted, [table.components[m] for m in members]


def _server(
    table: ServerTable,
    control: SlowdownControl,
    opts: WhatIfOptions,
    exp: WhatIfDir,
    console: Console,
) -> EmbeddedServer:
    from cputax.emulation import NONE, load_timing

    assert table.launch is not None
    launch = dataclasses.replace(table.launch, env={**table.launch.env, **control.env()})
    table = dataclasses.replace(table, launch=launch)
    emulation = None
    if opts.serve_cmd is None and opts.emulate_gpu != NONE and launch.emulation_flags is not None:
        emulation = load_timing(opts.emulate_gpu, opts.gpu_speed)
    console.print(
        f"[bold]starting {table.name}[/] with the slowdown plugin (log {exp.server_log})"
        + (f"; emulated GPU {emulation.name} x{emulation.gpu_speed:g}" if emulation else "")
    )
    return EmbeddedServer(
        table,
        log_path=exp.server_log,
        extra_args=opts.run.server_args,
        progress=lambda s: console.print(f"  ... starting, {s:.0f} s"),
        emulation=emulation,
    )


def whatif(opts: WhatIfOptions) -> int:
    console = Console(stderr=True)
    if opts.run.endpoint:
        raise CputaxError(
            "cputax whatif starts the server itself, with its slowdown plugin: drop --endpoint "
            "(use --serve-cmd 'vllm serve ... --port {port} {args}' for your own command)"
        )
    if opts.repeat < 1:
        raise CputaxError("--repeat must be at least 1")
    table = get("vllm" if opts.run.target == "auto" else opts.run.target)
    if opts.serve_cmd is not None:
        table = command_table(table, opts.serve_cmd)
    elif table.launch is None:
        raise CputaxError(f"cputax cannot start {table.name} itself: pass --serve-cmd")
    names, members = _components(table, opts.components, opts.placebo)
    profile = resolve_profile(opts.run.profile)
    scenarios = [s.name for s in select(load_profile(profile), opts.run.scenarios, profile)]
    exp = WhatIfDir.create(opts.out)
    control = SlowdownControl(exp.slowdown, table, members)
    control.write({})
    plan: dict[str, Any] = {
        "profile": str(profile),
        "scenarios": scenarios,
        "target": table.name,
        "serve_cmd": opts.serve_cmd,
        "components": names,
        "placebo": PLACEBO if PLACEBO in names else None,
        "slowdowns": list(opts.slowdowns),
        "repeat": opts.repeat,
        "cpu_model": cpu_model(),
        "gpu": None
        if opts.serve_cmd or opts.emulate_gpu == "none"
        else f"emulated {opts.emulate_gpu}",
        "gpu_speed": opts.gpu_speed,
        "points": plan_points(names, opts.slowdowns, opts.repeat),
    }
    exp.write_plan(plan)
    console.print(
        f"what-if directory: {exp}; {len(plan['points'])} runs of {profile.name} "
        f"({', '.join(scenarios)})"
    )
    try:
        with _server(table, control, opts, exp, console) as server:
            plan["server"] = {"command": server.command, "startup_s": round(server.startup_s, 1)}
            for i, point in enumerate(plan["points"]):
                name = point["folder"]
                console.rule(f"[{i + 1}/{len(plan['points'])}] {name}")
                slowed = (
                    {}
                    if point["component"] is None
                    else dict.fromkeys(point["component"].split("+"), point["k"])
                )
                control.write(slowed)
                run_opts = dataclasses.replace(
                    opts.run,
                    endpoint=server.endpoint,
                    model=server.model,
                    out=exp.run(name).path,
                    monitors=[SlowdownMonitor(control)],
                    pyspy=None,
                    target=table.name,
                )
                try:
                    results = run_profile(run_opts)
                except CputaxError as exc:
                    point.update(status="failed", message=str(exc).splitlines()[0])
                    console.print(f"[red]{name}: {point['message']}[/]")
                else:
                    problems = failures_of(results)
                    point.update(status="errors" if problems else "ok", problems=problems)
                exp.write_plan(plan)
    finally:
        exp.write_plan(plan)
        if any(p["status"] in ("ok", "errors") for p in plan["points"]):
            result = analyse_whatif(exp)
            write_whatif_report(exp, result)
            for line in summary_lines(result):
                console.print(line, markup=False)
            console.print(f"wrote {exp.result}, {exp.report_md} and {exp.report_html}")
    return 0 if all(p["status"] == "ok" for p in plan["points"]) else 1
