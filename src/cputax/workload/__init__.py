"""What to send: load profiles, agent traces, and the prompts of each request.

profiles  TOML load profiles -> Scenario records
prompts   ScenarioPrompts and ReplayPrompts: messages (untimed) and payloads (timed)
traces    agent traces parsed, checked and trimmed
blocks    the prompt text a trace's block ids stand for
"""

from cputax.workload.profiles import (
    CONTROL_SUFFIX,
    Scenario,
    is_control,
    load_profile,
    resolve_profile,
    select,
    with_controls,
)
from cputax.workload.prompts import (
    TOOL_MODES,
    CountFn,
    ReplayPrompts,
    ScenarioPrompts,
    chat_payload,
    local_counter,
)
from cputax.workload.traces import (
    Conversation,
    TraceError,
    load_conversations,
    trace_hit_rate,
    trim,
)

__all__ = [
    "CONTROL_SUFFIX",
    "TOOL_MODES",
    "Conversation",
    "CountFn",
    "ReplayPrompts",
    "Scenario",
    "ScenarioPrompts",
    "TraceError",
    "chat_payload",
    "is_control",
    "load_conversations",
    "load_profile",
    "local_counter",
    "resolve_profile",
    "select",
    "trace_hit_rate",
    "trim",
    "with_controls",
]
