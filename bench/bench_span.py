"""What vLLM's per-request span costs its API server: CPU per span.

    python bench/bench_span.py [--spans 5000] [--repeat 3]

The child process does what vLLM 0.32's `do_tracing` does at a request's end
(v1/engine/output_processor.py, tracing/otel.py): take the parent from a `traceparent`,
start the `llm_request` span at the arrival time, set its 13 attributes, end it. The
opentelemetry SDK's BatchSpanProcessor + OTLP/HTTP exporter post the spans to cputax's
receiver (client.otlp), which runs in this process so that its CPU is not counted.
Printed: process CPU time (all threads) per span, on the request path and with the
export thread. Spans go in groups of 1,000, each flushed, under the processor's queue of
2,048: a faster producer has spans dropped ("Queue full, dropping Span"), and so would a
server past about 2,000 requests per export delay.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUP = 1000
ATTRIBUTES = {
    "gen_ai.latency.time_to_first_token": 0.01,
    "gen_ai.latency.e2e": 0.1,
    "gen_ai.latency.time_in_queue": 0.001,
    "gen_ai.usage.prompt_tokens": 1000,
    "gen_ai.usage.completion_tokens": 32,
    "gen_ai.latency.time_in_model_prefill": 0.01,
    "gen_ai.latency.time_in_model_decode": 0.09,
    "gen_ai.latency.time_in_model_inference": 0.1,
    "gen_ai.request.id": "chatcmpl-" + "a" * 32,
    "gen_ai.request.top_p": 1.0,
    "gen_ai.request.max_tokens": 32,
    "gen_ai.request.temperature": 1.0,
    "gen_ai.request.n": 1,
}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(endpoint: str, spans: int) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    tracer = provider.get_tracer("vllm.tracing.otel")
    propagator = TraceContextTextMapPropagator()
    hot = 0.0
    start = _cpu()
    for _ in range(spans // GROUP):
        before = _cpu()
        for _ in range(GROUP):
            parent = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
            context = propagator.extract({"traceparent": parent})
            span = tracer.start_span(
                "llm_request", context=context, start_time=time.time_ns(), kind=SpanKind.SERVER
            )
            span.set_attributes(ATTRIBUTES)
            span.end()
        hot += _cpu() - before
        provider.force_flush()
    total = _cpu() - start
    provider.shutdown()
    n = spans // GROUP * GROUP
    print(
        f"{n} spans: {hot / n * 1e6:.1f} us CPU per span on the request path, "
        f"{total / n * 1e6:.1f} us with the export thread",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.spans)
        return
    from cputax.client.otlp import SpanReceiver
    from cputax.util import cpu_model

    print(f"CPU: {cpu_model()}")
    with tempfile.TemporaryDirectory() as folder:
        receiver = SpanReceiver(Path(folder) / "spans.jsonl").start()
        env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}
        try:
            for _ in range(args.repeat):
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        receiver.endpoint,
                        "--spans",
                        str(args.spans),
                    ],
                    check=True,
                    env=env,
                )
        finally:
            meta = receiver.stop()
    print(f"receiver: {meta['spans']} spans in {meta['posts']} posts, {meta['refused']} refused")


if __name__ == "__main__":
    main()
