"""What the tests that send load to the stub share: prompts prepared before the clock, and
what a finished run must return.

test_shards and test_loadgen_prepared each run a small scenario against a stub in a child
process (the `stub` fixture of conftest.py, configured by the module's STUB).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from cputax.targets.stub import StubConfig
from cputax.workload.profiles import Scenario
from cputax.workload.prompts import ScenarioPrompts, local_counter

__all__ = ["expected_exit", "prepared_prompts", "start_run"]

SRC = str(Path(__file__).resolve().parents[1] / "src")


def prepared_prompts(
    tok: Any, stub: StubConfig, context_tokens: int, **scenario: Any
) -> ScenarioPrompts:
    """Scenario "s": `context_tokens`-token prompts asking for as many tokens as `stub` sends,
    prepared (counted with `tok`) as a run prepares them before its clock starts."""
    scenario_ = Scenario(
        name="s", context_tokens=context_tokens, max_tokens=stub.output_tokens, **scenario
    )
    prompts = ScenarioPrompts(scenario_, tok, model=stub.model)
    asyncio.run(prompts.prepare(local_counter(tok)))
    return prompts


def expected_exit(out: Path) -> int:
    """What `run` or `replay` returns for the run in `out`: 1 where a scenario broke the
    run's own invariants, else 0. On a loaded machine the client can be starved past their
    5 ms bars (a late read, a late start); the run catches that, withholds the scenario's
    CPU% and exits 1, which is the product working (tests/test_invariants.py pins the bars
    down). No request may have failed, in either case."""
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert all(s["errors"] == 0 for s in summary["scenarios"]), summary["scenarios"]
    return 0 if all(s["invariants"]["ok"] for s in summary["scenarios"]) else 1


def start_run(endpoint: str, profile: Path, out: Path, *args: str) -> subprocess.Popen[str]:
    """`cputax run` against `endpoint` as a user starts it from a terminal: its own process
    (and session, so a test can send the terminal's Ctrl-C to the whole group), this
    checkout's code, pipes for its output, `--gpu none`, and `args` after."""
    command = [
        sys.executable,
        "-m",
        "cputax",
        "run",
        "--endpoint",
        endpoint,
        "--profile",
        str(profile),
        "--out",
        str(out),
        "--gpu",
        "none",
        *args,
    ]
    return subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": SRC},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
