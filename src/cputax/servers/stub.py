"""The calibration stub (`cputax stub`): what it mimics, as data.

The stub answers like vLLM (its metric names, its streaming shape, its refusal of
`tools` without a tool parser), so that the client can be tested against known delays.
Each behaviour it copies from vLLM is checked against the embedded vLLM in
tests/test_vllm_target.py.
"""

from __future__ import annotations

from cputax.servers import vllm
from cputax.servers.base import Capabilities, Rule, ServerTable

TABLE = ServerTable(
    name="stub",
    processes=(("stub", r"cputax\.targets\.stub|(^|[\s/])cputax\s+stub(\s|$)"),),
    threads=(("stub", "MainThread", "event loop: aiohttp, SSE"),),
    rules=(
        Rule("sse", "cputax/targets/stub/*.py", "*_stream*"),
        Rule("tokenize", "cputax/targets/stub/app.py", "*_count*"),
        Rule("metrics_scrape", "cputax/targets/stub/app.py", "*metrics_page*"),
        Rule("http", "aiohttp/*"),
    ),
    markers=("cputax/targets/stub/*",),
    metrics=vllm.TABLE.metrics,
    capabilities=Capabilities(
        tokenize_path="/tokenize", auto_tool_choice=vllm.TABLE.capabilities.auto_tool_choice
    ),
)
