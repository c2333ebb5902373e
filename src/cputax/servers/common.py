"""Rules every Python server shares: waits, GC, tokenizers and chat templates, the HTTP stack.

A server's own table comes first (see `servers.rules_for`); these catch what is left.
"""

from __future__ import annotations

from cputax.servers.base import Rule

# --- shared by every server: waits, GC, libraries every Python server uses ------------------
# Streaming responses: everything below Starlette's streaming body is SSE work, the socket
# writes through uvicorn included (they would otherwise count as http).
STREAMING = ("starlette/*", "*StreamingResponse*")
COMMON_RULES = (
    # idle: the innermost Python frame is a known wait. A C call that blocks without a
    # Python wrapper (time.sleep) shows as its caller and is not idle.
    Rule("idle", "selectors.py", "*select", leaf=True),
    Rule("idle", "threading.py", "*wait*", leaf=True),  # Condition/Event.wait, join
    Rule("idle", "queue.py", "*get", leaf=True),
    Rule("idle", "concurrent/futures/thread.py", "_worker", leaf=True),  # pool thread, no work
    Rule("idle", "multiprocessing/connection.py", "*", leaf=True),
    Rule("idle", "zmq/sugar/poll.py", "*", leaf=True),
    Rule("idle", "zmq/sugar/socket.py", "Socket.recv*", leaf=True),  # blocked in the C recv
    Rule("idle", "zmq/asyncio.py", "*poll*", leaf=True),
    Rule("idle", "uvloop/*", "*", leaf=True),  # the uvloop loop is C: innermost = waiting
    Rule("idle", "asyncio/runners.py", "*", leaf=True),  # same for any C loop under asyncio.run
    # gc: only visible with --native (the collector runs inside whatever allocated)
    Rule("gc", "*", "gc_collect*"),
    Rule("gc", "*", "_PyGC_Collect*"),
    Rule("gc", "*gcmodule.c"),
    Rule("gc", "*gc.c", "*collect*"),
    Rule("gpu_wait", "torch/cuda/*", "*synchronize"),  # Stream/Event/device synchronize
    Rule("gpu_wait", "torch/cuda/*", "*.query"),
    # Hugging Face tokenizers and chat templates (every server here uses them)
    Rule("detokenize", "transformers/tokenization_utils*", "*decode*"),
    Rule("chat_template", "transformers/tokenization_utils*", "*apply_chat_template"),
    Rule("chat_template", "transformers/processing_utils.py", "*apply_chat_template"),
    Rule("chat_template", "transformers/utils/chat_template_utils.py"),
    Rule("chat_template", "jinja2/*"),
    Rule("tokenize", "transformers/tokenization_utils*"),
    Rule("tokenize", "tokenizers/*"),
    # Answering GET /metrics (a scraper's cost, cputax's included) apart from the server's own
    # per-request instrumentation (middleware, stat loggers: `metrics`).
    Rule("metrics_scrape", "prometheus_client/exposition.py", "generate_latest*"),
    Rule(
        "metrics_scrape",
        "prometheus_client/*",
        within=("prometheus_client/exposition.py", "generate_latest*"),
    ),
    Rule("metrics_scrape", "prometheus_fastapi_instrumentator/*", "*expose*"),
    Rule("metrics", "prometheus_fastapi_instrumentator/*"),
    Rule("metrics", "prometheus_client/*"),
    Rule("metrics", "opentelemetry/*"),
    Rule("ipc", "zmq/*"),
    Rule("ipc", "msgspec/*"),
    Rule("sse", "uvicorn/*", within=STREAMING),
    Rule("sse", "starlette/*", within=STREAMING),
    Rule("sse", *STREAMING),
    Rule("sse", "starlette/responses.py", "*stream_response*"),
    Rule("sse", "sse_starlette/*"),
    Rule("http", "uvicorn/*"),
    Rule("http", "starlette/*"),
    Rule("http", "fastapi/*"),
    Rule("http", "h11/*"),
    Rule("http", "httptools/*"),
)
