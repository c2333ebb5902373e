"""The `vllm.general_plugins` entry point (pyproject.toml). vLLM calls `register()` in
every one of its processes: API server, EngineCore and workers.

It does nothing unless cputax asked, through the environment of the server it starts:
users install cputax next to production vLLMs. Each feature is one (env var, register)
pair in FEATURES, so a second one (component slowdowns) goes beside the emulated GPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

__all__ = ["ARCHITECTURE", "EMULATE_ENV", "FEATURES", "SPIN_ENV", "register"]

EMULATE_ENV = "CPUTAX_EMULATE_GPU"  # the TimingModel as JSON (TimingModel.to_env)
# "1": keep vLLM's spin on its shared-memory ring (the CPU platform's multiproc layout as is)
SPIN_ENV = "CPUTAX_EMULATED_GPU_SPIN"
ARCHITECTURE = "CputaxEmulatedGpuForCausalLM"  # what the emulated model's config.json names
AFTER_PING_S = 0.0005
POLL_CAP_MS = 2


def _register_emulated_gpu() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "cputax.emulation.model:EmulatedGpuForCausalLM")
    if os.environ.get(SPIN_ENV) != "1":
        _wait_without_spinning()


def _wait_without_spinning() -> None:
    """The CPU platform forces the multiproc executor: the EngineCore then waits for each
    model step by spinning on a shared-memory ring (SpinCondition: sched_yield for a second
    after each read), and the worker spins the same way for the next step. A single-GPU
    vLLM runs the model inside the EngineCore and blocks on it. So readers of the ring
    wait on its notify socket at once (what SpinCondition does after a second idle): the
    emulated GPU's steps then leave the CPU to the front end, as one GPU would.

    The writer pings before it marks the block written, so a reader woken by the ping
    may find nothing yet: it yields for AFTER_PING_S before it sleeps again, and no sleep
    is longer than POLL_CAP_MS (a ping lost to that race costs at most that)."""
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls.wait, "cputax_no_spin", False):
        return
    original = cls.wait

    def wait(self, timeout_ms: int | None = None) -> None:
        self.busy_loop_s = 0  # instances made before the plugin loaded (the worker's) too
        if time.monotonic() - getattr(self, "cputax_woke", 0.0) < AFTER_PING_S:
            os.sched_yield()
            return
        cap = POLL_CAP_MS if timeout_ms is None else min(timeout_ms, POLL_CAP_MS)
        slept = time.monotonic()
        original(self, cap)
        woke = time.monotonic()
        if woke - slept < 0.8 * cap / 1e3:  # a ping, not the cap: the block lands next
            self.cputax_woke = woke

    wait.cputax_no_spin = True  # type: ignore[attr-defined]
    cls.wait = wait


# (environment variable that asks for the feature, what registers it)
FEATURES: tuple[tuple[str, Callable[[], None]], ...] = ((EMULATE_ENV, _register_emulated_gpu),)


def register() -> None:
    for env, feature in FEATURES:
        if os.environ.get(env):
            feature()
