"""What the load generator's tests against the stub share: prompts prepared before the clock.

test_shards and test_loadgen_prepared each run a small scenario against a stub in a child
process (the `stub` fixture of conftest.py, configured by the module's STUB).
"""

from __future__ import annotations

import asyncio
from typing import Any

from cputax.targets.stub import StubConfig
from cputax.workload.profiles import Scenario
from cputax.workload.prompts import ScenarioPrompts, local_counter

__all__ = ["prepared_prompts"]


def prepared_prompts(
    tok: Any, stub: StubConfig, context_tokens: int, **scenario: Any
) -> ScenarioPrompts:
    """Scenario "s": `context_tokens`-token prompts asking for as many tokens as `stub` sends,
    prepared (counted with `tok`) as a run prepares them before its clock starts."""
    scenario_ = Scenario(name="s", context_tokens=context_tokens, max_tokens=stub.output_tokens,
                         **scenario)
    prompts = ScenarioPrompts(scenario_, tok, model=stub.model)
    asyncio.run(prompts.prepare(local_counter(tok)))
    return prompts
