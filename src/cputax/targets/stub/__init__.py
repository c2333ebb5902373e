"""The calibration stub: an OpenAI-compatible SSE server that answers like vLLM, with known delays.

It is the ground truth for the client's timing. For a streamed request that
arrives (handler entered) at T, it sends the response headers at T+A, the
role-only chunk and the first token at T+A+B, token k at T+A+B+k*C, then the
usage chunk and `data: [DONE]`, as vLLM does (see shared/notes/vllm.md,
"Streaming timing"). Every wait sleeps until an absolute monotonic deadline, so
errors never accumulate. What really happened (monotonic_ns of arrival,
headers, first token, last token, end) is kept per response id, served and
forgotten by GET /stub/truth: a client in another process on the same host
reads the same clock, so it can subtract.

Chunk bytes are built once per server (per token position) and glued to a
per-request head, so at zero delay the stub costs little next to the client
it is calibrating.

    config   StubConfig: the delays, the answers' shape, the fault to inject
    app      the HTTP handlers (vLLM's endpoints) and the stub's Prometheus metrics
    faults   the fault injection: streams broken on purpose
    server   the process lifecycle: `cputax stub`, StubServer (a thread or a child)
"""

from cputax.targets.stub.app import TOOL_CHOICE_REFUSED
from cputax.targets.stub.config import StubConfig
from cputax.targets.stub.faults import FAULTS
from cputax.targets.stub.server import StubServer, child_main, serve_stub

__all__ = ["FAULTS", "TOOL_CHOICE_REFUSED", "StubConfig", "StubServer", "child_main", "serve_stub"]
