"""`cputax micro`: run the chosen suites into one pyperf JSON file, then summarize it.

Each suite runs as its own `python -m cputax.micro SUITE --append FILE`
process. pyperf appends every benchmark to FILE as soon as it finishes, so the
results of finished suites (and benchmarks) survive a later failure or Ctrl-C.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from cputax.errors import CputaxError
from cputax.micro.harness import SUITES, THREAD_ENV, suite_cases
from cputax.micro.summary import table
from cputax.text.tokenizer import load_tokenizer

MODE_FLAGS = {"fast": ["--fast"], "rigorous": ["--rigorous"], "debug": ["--debug-single-value"]}
# pyperf prints "NAME: Mean +- std dev: ..." (or "NAME: 1.23 ms") when a benchmark is done.
DONE_LINE = re.compile(r"^(?P<name>\S+): ")
LOG_TAIL = 25
SUMMARY_WIDTH = 120


def default_output() -> Path:
    return Path("results") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"


def suite_command(
    suite: str, mode: str, output: Path, tokenizer: str | None, cache_dir: Path, extra: list[str]
) -> list[str]:
    """The pyperf command line of one suite; `extra` comes last so the user's options win."""
    cmd = [
        sys.executable,
        "-m",
        "cputax.micro",
        suite,
        *MODE_FLAGS[mode],
        "--append",
        str(output),
        "--inherit-environ",
        ",".join(THREAD_ENV),
        "--input-cache",
        str(cache_dir),
    ]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    return cmd + list(extra)


def _run_suite(
    cmd: list[str], names: set[str], progress: Progress, task: int
) -> tuple[int, list[str]]:
    """Run one suite, advancing its progress line per finished benchmark; keep the log's tail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=LOG_TAIL)
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            match = DONE_LINE.match(line)
            if match and match["name"] in names:
                progress.advance(task)
    return proc.returncode, list(tail)


def run_micro(
    suites: list[str],
    mode: str = "fast",
    output: Path | None = None,
    tokenizer: str | None = None,
    extra: list[str] | None = None,
) -> int:
    """Run `suites` in pyperf `mode` into `output`, print the summary; 0 if every suite passed."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise CputaxError(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if mode not in MODE_FLAGS:
        raise CputaxError(f"unknown mode {mode!r}; choose from {', '.join(MODE_FLAGS)}")
    load_tokenizer(tokenizer)  # a bad --tokenizer fails here, in one line, before any suite starts
    output = output or default_output()
    if output.exists():
        raise CputaxError(f"{output} already exists; pass another -o or delete it")
    output.parent.mkdir(parents=True, exist_ok=True)

    console = Console(stderr=True)
    failed: list[str] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("benchmarks"),
        TimeElapsedColumn(),
    )
    with (
        tempfile.TemporaryDirectory(prefix="cputax-micro-") as cache_dir,
        Progress(*columns, console=console) as progress,
    ):
        for suite in suites:
            names = {case.name for case in suite_cases(suite)}
            task = progress.add_task(suite, total=len(names))
            cmd = suite_command(suite, mode, output, tokenizer, Path(cache_dir), extra or [])
            code, tail = _run_suite(cmd, names, progress, task)
            if code != 0:
                failed.append(suite)
                progress.console.print(
                    f"[red]suite {suite} failed (exit {code}); last lines:[/red]"
                )
                progress.console.print("\n".join(tail), markup=False, highlight=False)
    if output.exists():
        out = Console()
        if not out.is_terminal:
            out.width = SUMMARY_WIDTH  # rich assumes 80 columns for pipes and files
        out.print(table(output))
        console.print(
            f"results: {output}  (compare runs: cputax micro --compare A.json B.json)",
            soft_wrap=True,
        )
    if failed:
        console.print(f"[red]failed suites: {', '.join(failed)}[/red]")
        return 1
    return 0


def compare_files(a: str, b: str) -> int:
    """Show pyperf's own comparison table (t-test, geometric mean) of two results files."""
    for path in (a, b):
        if not Path(path).is_file():
            raise CputaxError(f"--compare: no such file {path}")
    return subprocess.call([sys.executable, "-m", "pyperf", "compare_to", a, b, "--table"])
