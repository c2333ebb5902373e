"""The pyperf side of every suite: one Runner, lazy per-benchmark setup, metadata.

A suite module (cputax.micro.tokenization, .payloads, .hashing, .chunks,
.detokenization, one per suite in SUITES) only lists
`Case`s: a name, the timed step, and a `prepare` that builds the step's
arguments. `run_suite` registers every case with pyperf in the same order in
every process, but builds inputs only in the worker that times that case, so a
worker for `tokenize.encode[679]` never builds the 100k-token corpus.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyperf

from cputax.micro import SUITES
from cputax.micro.inputs import Inputs

# pyperf's default is 20 worker processes (--fast: 10, --rigorous: 40). Each of
# ours loads Python, cputax and often a 100k-token input, so half that keeps a
# fast run of every suite within minutes on two cores: --fast gives 5 processes
# x 2 values, --rigorous 20 x 3 (pyperf's own default).
PROCESSES = 10

# Versions recorded with every benchmark (pyperf adds Python and the CPU model).
LIBRARIES = ("cputax", "pyperf", "tokenizers", "orjson", "cbor2", "xxhash", "blake3", "jinja2")
# Environment that changes tokenizers' thread pool; `cputax micro` passes both to
# workers with --inherit-environ (pyperf workers get a scrubbed environment).
THREAD_ENV = ("TOKENIZERS_PARALLELISM", "RAYON_NUM_THREADS")

Metadata = dict[str, str | int | float]


@dataclass(frozen=True)
class Report:
    """How the summary shows a case: `unit` per operation, over `per` items (tokens, chunks)."""

    unit: str
    per: int = 1


@dataclass(frozen=True)
class Prepared:
    """The step's arguments, and what to record about them (e.g. input_tokens)."""

    args: tuple[Any, ...]
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    """One benchmark: `step(*prepare(inputs).args)` is what pyperf times."""

    name: str
    step: Callable[..., object]
    prepare: Callable[[Inputs], Prepared]
    report: Report


def suite_cases(suite: str) -> list[Case]:
    """The cases of `suite`, in registration order (cheap: builds no inputs)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"cputax.micro.{SUITES[suite]}").cases()


def library_metadata() -> Metadata:
    """Library versions and thread settings: what a number depends on besides the CPU."""
    meta: Metadata = {}
    for name in LIBRARIES:
        try:
            meta[f"{name}_version"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            meta[f"{name}_version"] = "not installed"
    for var in THREAD_ENV:
        meta[var.lower()] = os.environ.get(var, "unset")
    return meta


def _worker_args(cmd: list[str], args: Any) -> None:
    """Pass our own options on to pyperf's worker processes."""
    if args.tokenizer:
        cmd.extend(["--tokenizer", args.tokenizer])
    if args.input_cache:
        cmd.extend(["--input-cache", args.input_cache])


def _runs_here(args: Any, index: int) -> bool:
    """Whether this process times case `index` (pyperf's --worker-task numbers cases in order)."""
    if args.worker:
        return args.worker_task is None or args.worker_task == index
    return bool(args.in_process)


def run_suite(
    suite: str, argv: Sequence[str] | None = None, program_args: tuple[str, ...] | None = None
) -> None:
    """Run one suite under pyperf; `argv` holds pyperf options plus --tokenizer and
    --input-cache."""
    runner = pyperf.Runner(
        processes=PROCESSES, program_args=program_args, add_cmdline_args=_worker_args
    )
    if program_args:
        runner.argparser.prog = " ".join(("python", *program_args))
    runner.argparser.add_argument(
        "--tokenizer", help="tokenizer.json path, model directory or hub id"
    )
    runner.argparser.add_argument(
        "--input-cache", help="directory where workers share built inputs"
    )
    args = runner.parse_args(list(argv) if argv is not None else None)
    inputs = Inputs(args.tokenizer, Path(args.input_cache) if args.input_cache else None)
    for index, case in enumerate(suite_cases(suite)):
        if not _runs_here(args, index):
            runner.bench_func(case.name, case.step)  # only counts the task; never called here
            continue
        prepared = case.prepare(inputs)
        metadata = {**library_metadata(), **inputs.tokenizer_metadata(), **prepared.metadata}
        runner.bench_func(case.name, case.step, *prepared.args, metadata=metadata)
