"""The stub's settings: injected delays, the shape of each answer, the fault to inject."""

from __future__ import annotations

from dataclasses import dataclass

from cputax.errors import CputaxError
from cputax.servers import STUB
from cputax.targets.stub.faults import FAULTS

__all__ = ["StubConfig"]


@dataclass
class StubConfig:
    """Injected delays (ms) and shape of each answer; `fault` breaks streams on purpose for
    tests."""

    headers_delay_ms: float = (
        0.0  # A: arrival -> response headers (vLLM: parse + template + tokenize)
    )
    first_token_delay_ms: float = 0.0  # B: headers -> role chunk + first token (queue + prefill)
    inter_token_delay_ms: float = 0.0  # C: between tokens (decode)
    output_tokens: int = 64  # tokens per answer, fewer if the request's max_tokens says so
    model: str = "cputax-stub"
    max_model_len: int = 131072
    api_key: str | None = None  # when set, requests without `Authorization: Bearer KEY` get 401
    fault: str | None = None
    # vLLM without --enable-auto-tool-choice refuses `tools` unless tool_choice is "none"
    # (servers.stub.TABLE copies this from vLLM's table; tests check it against the real one)
    auto_tool_choice: bool = STUB.capabilities.auto_tool_choice
    token_truth: bool = (
        False  # keep every token's send time in the truth (calibration's inter-token error)
    )

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise CputaxError(f"unknown stub fault {self.fault!r}; choose from {', '.join(FAULTS)}")
        if min(self.headers_delay_ms, self.first_token_delay_ms, self.inter_token_delay_ms) < 0:
            raise CputaxError("stub delays must be >= 0 ms")
        if self.output_tokens < 1:
            raise CputaxError("the stub's output tokens must be >= 1")
