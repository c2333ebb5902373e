"""The stub's fault injection: streams broken on purpose, so tests see each failure a
real server can give (the byte-level ones a real server rarely gives are in the tests'
own fault server, tests/faultserver.py)."""

from __future__ import annotations

import socket
import struct

import orjson
from aiohttp import web

__all__ = ["FAULTS", "MIDSTREAM", "break_stream", "error_body"]

FAULTS = (
    "http_500",  # 500 with a vLLM error body instead of a stream
    # after one token, a `data: {"error": ...}` line then [DONE], as vLLM on an engine error
    "error_event",
    "malformed_sse",  # after one token, a line that is not SSE
    "non_json_data",  # after one token, `data: {not json`
    "reset_midstream",  # after one token, a TCP reset
    # after half the tokens, the stream ends cleanly without finish_reason, usage or [DONE]
    "truncated",
    "no_usage",  # no usage chunk even when stream_options.include_usage asks for one
)
# the faults that break a stream after its first token (break_stream)
MIDSTREAM = ("error_event", "malformed_sse", "non_json_data", "reset_midstream")


def error_body(status: int, message: str, kind: str) -> bytes:
    """vLLM's error object."""
    return orjson.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    )


async def break_stream(
    request: web.Request, response: web.StreamResponse, fault: str
) -> web.StreamResponse:
    """End a stream the way `fault` says (one of MIDSTREAM), after its first token."""
    if fault == "reset_midstream":
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport else None
        if sock is not None:  # linger 0: close() sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if transport is not None:
            transport.abort()
        return response
    if fault == "error_event":
        await response.write(
            b"data: "
            + error_body(500, "stub fault: injected engine error", "InternalServerError")
            + b"\n\n"
        )
    elif fault == "malformed_sse":
        await response.write(b"this line is not server-sent events\n\n")
    else:
        await response.write(b"data: {not json\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response
