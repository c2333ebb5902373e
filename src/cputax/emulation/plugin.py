"""The `vllm.general_plugins` entry point (pyproject.toml). vLLM calls `register()` in
every one of its processes: API server, EngineCore and workers.

It does nothing unless cputax asked, through the environment of the server it starts:
users install cputax next to production vLLMs. Each feature is one (env var, register)
pair in FEATURES, so a second one (component slowdowns) goes beside the emulated GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["ARCHITECTURE", "EMULATE_ENV", "FEATURES", "register"]

EMULATE_ENV = "CPUTAX_EMULATE_GPU"  # the TimingModel as JSON (TimingModel.to_env)
ARCHITECTURE = "CputaxEmulatedGpuForCausalLM"  # what the emulated model's config.json names


def _register_emulated_gpu() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "cputax.emulation.model:EmulatedGpuForCausalLM")


# (environment variable that asks for the feature, what registers it)
FEATURES: tuple[tuple[str, Callable[[], None]], ...] = (
    (EMULATE_ENV, _register_emulated_gpu),
)


def register() -> None:
    for env, feature in FEATURES:
        if os.environ.get(env):
            feature()
