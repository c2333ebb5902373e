"""`cputax stub`: the calibration SSE server with injected delays, in the foreground."""

from __future__ import annotations

from cputax.targets.stub import StubConfig, serve_stub

__all__ = ["stub"]


def stub(host: str, port: int, config: StubConfig) -> int:
    return serve_stub(host, port, config)
