"""The stub's HTTP handlers: vLLM's endpoints, answered with the configured delays.

For a streamed request that arrives (handler entered) at T, it sends the response
headers at T+A, the role-only chunk and the first token at T+A+B, token k at
T+A+B+k*C, then the usage chunk and `data: [DONE]`, as vLLM does (see
shared/notes/vllm.md, "Streaming timing"). Every wait sleeps until an absolute monotonic
deadline, so errors never accumulate. What really happened is kept per response id and
served (and forgotten) by GET /stub/truth.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from cputax import __version__
from cputax.servers import STUB
from cputax.targets.stub.config import StubConfig
from cputax.targets.stub.faults import MIDSTREAM, break_stream, error_body
from cputax.text.conversation import render_chat
from cputax.text.tokenizer import load_tokenizer
from cputax.util import sleep_until

__all__ = ["TOOL_CHOICE_REFUSED", "StubApp", "StubMetrics"]

_WORDS = [
    " the",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " a",
    " lazy",
    " dog",
    ",",
    " then",
    " runs",
    " tests",
    " again",
    ".",
    "\n",
]
_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
_INLINE_COUNT_BYTES = 16 << 10  # smaller prompts are counted on the event loop, larger in a thread
_MS = 1_000_000
_TRUTH_KEPT = 100_000  # requests whose truth /stub/truth can still return
# vLLM 0.32's answer to `tools` with tool_choice "auto" (the default) on default flags
TOOL_CHOICE_REFUSED = (
    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
)


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, kind), content_type="application/json"
    )


def _chunk_tail(choice: dict[str, Any]) -> bytes:
    return orjson.dumps([choice]) + b"}\n\n"


class StubMetrics:
    """vLLM's metrics (names from its table in cputax.servers) with the stub's true timings,
    in a registry of its own."""

    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, as vLLM's API server
        names = ["model_name", "engine"]
        labels = {"model_name": model, "engine": "0"}
        table = STUB.metrics

        def histogram(quantity: str, doc: str) -> Any:
            return Histogram(
                table.histograms[quantity][0], doc, names, buckets=_BUCKETS, registry=self.registry
            ).labels(**labels)

        def gauge(quantity: str, doc: str) -> Any:
            return Gauge(table.gauges[quantity][0], doc, names, registry=self.registry).labels(
                **labels
            )

        def counter(quantity: str, doc: str) -> Any:
            name = table.counters[quantity][0].removesuffix("_total")  # prometheus_client adds it
            return Counter(name, doc, names, registry=self.registry).labels(**labels)

        self.e2e = histogram("e2e", "Arrival to last byte.")
        self.ttft = histogram("ttft", "Arrival to first token sent.")
        self.queue = histogram("queue", "Always 0: the stub has no queue.")
        self.prefill = histogram("prefill", "Headers to first token (the B delay).")
        self.decode = histogram("decode", "First token to last token.")
        self.running = gauge("running", "Streams in progress.")
        self.waiting = gauge("waiting", "Always 0.")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens.")
        self.generation_tokens = counter("generation_tokens", "Tokens sent.")

    def observe(self, truth: dict[str, int], prompt_tokens: int, tokens: int) -> None:
        arrival, first, last, end = (
            truth.get(k) for k in ("arrival_ns", "first_token_ns", "last_token_ns", "end_ns")
        )
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        if first is None or end is None:
            return
        self.e2e.observe((end - arrival) / 1e9)
        self.ttft.observe((first - arrival) / 1e9)
        self.queue.observe(0.0)
        self.prefill.observe((first - truth["headers_ns"]) / 1e9)
        self.decode.observe((last - first) / 1e9)


class StubApp:
    """The application: handlers plus what they share (tokenizer, metrics, truth, chunk bytes)."""

    def __init__(self, config: StubConfig):
        self.config = config
        self.tokenizer = load_tokenizer()
        self.metrics = StubMetrics(config.model)
        self.truth: dict[str, dict[str, int]] = {}
        self._counts: OrderedDict[bytes, int] = OrderedDict()  # raw body -> prompt tokens
        self._model = orjson.dumps(config.model)
        self._chat = {
            reason: [
                _chunk_tail(
                    {
                        "index": 0,
                        "delta": {"content": w},
                        "logprobs": None,
                        "finish_reason": reason,
                        **({"stop_reason": None} if reason else {}),
                    }
                )
                for w in _WORDS
            ]
            for reason in (None, "length", "stop")
        }
        self._text = {
            reason: [
                _chunk_tail(
                    {
                        "index": 0,
                        "text": w,
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                )
                for w in _WORDS
            ]
            for reason in (None, "length", "stop")
        }
        self._role = _chunk_tail(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 << 20)  # 100k-token prompts with tools fit
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/version", self.version)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/stub/truth", self.pop_truth)
        return app

    # -- small endpoints ---------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def version(self, request: web.Request) -> web.Response:
        return web.Response(
            body=orjson.dumps({"version": f"cputax-stub {__version__}"}),
            content_type="application/json",
        )

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.config.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        return web.Response(
            body=orjson.dumps({"object": "list", "data": [card]}), content_type="application/json"
        )

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def pop_truth(self, request: web.Request) -> web.Response:
        """Per response id, the true monotonic_ns of each step; forgotten once read."""
        truth, self.truth = self.truth, {}
        return web.Response(body=orjson.dumps(truth), content_type="application/json")

    async def tokenize(self, request: web.Request) -> web.Response:
        parsed = await self._body(request)
        if isinstance(parsed, web.Response):
            return parsed
        body = parsed[0]
        if "messages" in body:
            text = render_chat(
                body["messages"],
                body.get("tools"),
                add_generation_prompt=body.get("add_generation_prompt", True),
            )
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _error(400, "give `prompt` (a string) or `messages`")
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
        )
        return web.Response(
            body=orjson.dumps(
                {
                    "count": len(ids),
                    "max_model_len": self.config.max_model_len,
                    "tokens": ids,
                    "token_strs": None,
                }
            ),
            content_type="application/json",
        )

    # -- request checks and prompt counting ----------------------------------

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], bytes] | web.Response:
        """The JSON body and its bytes, or the error response vLLM would give."""
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return web.Response(
                status=401,
                body=orjson.dumps({"error": "Unauthorized"}),
                content_type="application/json",
            )
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            return _error(400, f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model:
            return _error(404, f"The model `{model}` does not exist.", "NotFoundError")
        return body, raw

    def _count(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            return self.tokenizer.count(render_chat(body["messages"], body.get("tools")))
        prompt = body["prompt"]
        if isinstance(prompt, list):  # token ids
            return len(prompt)
        return self.tokenizer.count(prompt)

    async def _prompt_tokens(self, body: dict[str, Any], raw: bytes, chat: bool) -> int:
        """Count like vLLM's front end; cached per body (calibration repeats one), big ones off
        the loop."""
        count = self._counts.get(raw)
        if count is None:
            if len(raw) < _INLINE_COUNT_BYTES:
                count = self._count(body, chat)
            else:
                count = await asyncio.get_running_loop().run_in_executor(
                    None, self._count, body, chat
                )
            self._counts[raw] = count
            if len(self._counts) > 64:
                self._counts.popitem(last=False)
        return count

    # -- completions ----------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic_ns()
        parsed = await self._body(request)
        if isinstance(parsed, web.Response):
            return parsed
        body, raw = parsed
        field = "messages" if chat else "prompt"
        if not body.get(field):
            return _error(400, f"`{field}` is required")
        if (
            chat
            and body.get("tools")
            and not self.config.auto_tool_choice
            and body.get("tool_choice", "auto") == "auto"
        ):
            return _error(400, TOOL_CHOICE_REFUSED)
        try:
            prompt_tokens = await self._prompt_tokens(body, raw, chat)
        except (
            Exception
        ) as exc:  # a template or tokenizer failure is the client's bad input, as in vLLM
            return _error(400, f"could not tokenize the prompt: {exc}")
        cfg = self.config
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n = (
            min(cfg.output_tokens, limit)
            if isinstance(limit, int) and limit > 0
            else cfg.output_tokens
        )
        reason = "length" if n == limit else "stop"
        await sleep_until(arrival + int(cfg.headers_delay_ms * _MS))
        if cfg.fault == "http_500":
            return _error(500, "stub fault: injected internal server error", "InternalServerError")
        # vLLM's response id is the prefix + the client's X-Request-Id when it sends one
        rid = ("chatcmpl-" if chat else "cmpl-") + (
            request.headers.get("x-request-id") or os.urandom(12).hex()
        )
        truth: dict[str, Any] = {"arrival_ns": arrival}
        if cfg.token_truth:
            truth["token_ns"] = []
        # The truth is kept under the client's x-request-id when it sends one (vLLM's own
        # benchmark does; cputax always does), and under the response id the first chunk carries.
        key = request.headers.get("x-request-id") or rid
        self.metrics.running.inc()
        try:
            if body.get("stream"):
                options = body.get("stream_options") or {}
                usage = options.get("include_usage") and cfg.fault != "no_usage"
                response = await self._stream(
                    request, truth, rid, chat, n, reason, prompt_tokens if usage else None
                )
            else:
                response = await self._whole(truth, rid, chat, n, reason, prompt_tokens)
        finally:
            self.metrics.running.dec()
            self.truth[key] = self.truth[rid] = truth
            while len(self.truth) > _TRUTH_KEPT:  # nobody reads it: keep memory bounded
                del self.truth[next(iter(self.truth))]
            self.metrics.observe(truth, prompt_tokens, n)
        return response

    async def _stream(
        self,
        request: web.Request,
        truth: dict[str, int],
        rid: str,
        chat: bool,
        n: int,
        reason: str,
        usage_prompt: int | None,
    ) -> web.StreamResponse:
        cfg = self.config
        kind = b"chat.completion.chunk" if chat else b"text_completion"
        head = (
            b'data: {"id":"'
            + rid.encode()
            + b'","object":"'
            + kind
            + b'","created":'
            + str(int(time.time())).encode()
            + b',"model":'
            + self._model
            + b',"choices":'
        )
        tails = self._chat if chat else self._text
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "x-request-id": rid}
        )
        first = truth["arrival_ns"] + int((cfg.headers_delay_ms + cfg.first_token_delay_ms) * _MS)
        step = int(cfg.inter_token_delay_ms * _MS)
        try:
            truth["headers_ns"] = time.monotonic_ns()
            await response.prepare(request)
            for k in range(n):
                await sleep_until(first + k * step)
                words = tails[reason if k == n - 1 else None]
                chunk = head + words[k % len(words)]  # made before the stamp: the stamp is the send
                now = time.monotonic_ns()
                if k == 0:
                    truth["first_token_ns"] = now
                    if chat:  # vLLM's role-only chunk goes out with the first token
                        await response.write(head + self._role)
                elif k == 1 and cfg.fault in MIDSTREAM:
                    return await break_stream(request, response, cfg.fault)
                elif k == n // 2 and cfg.fault == "truncated":
                    await response.write_eof()
                    return response
                await response.write(chunk)
                truth["last_token_ns"] = now
                if cfg.token_truth:
                    truth["token_ns"].append(now)
            if usage_prompt is not None:
                usage = {
                    "prompt_tokens": usage_prompt,
                    "total_tokens": usage_prompt + n,
                    "completion_tokens": n,
                }
                await response.write(head + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            truth["end_ns"] = time.monotonic_ns()
        except ConnectionError:  # the client went away; the truth so far is kept
            truth["disconnected_ns"] = time.monotonic_ns()
        return response

    async def _whole(
        self, truth: dict[str, int], rid: str, chat: bool, n: int, reason: str, prompt_tokens: int
    ) -> web.Response:
        """A non-streamed answer, sent when the last token would have been."""
        cfg = self.config
        first = truth["arrival_ns"] + int((cfg.headers_delay_ms + cfg.first_token_delay_ms) * _MS)
        truth["first_token_ns"] = first
        truth["last_token_ns"] = first + (n - 1) * int(cfg.inter_token_delay_ms * _MS)
        await sleep_until(truth["last_token_ns"])
        text = "".join(_WORDS[k % len(_WORDS)] for k in range(n))
        choice: dict[str, Any] = {
            "index": 0,
            "logprobs": None,
            "finish_reason": reason,
            "stop_reason": None,
        }
        choice.update(
            {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + n,
            "completion_tokens": n,
        }
        answer = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": cfg.model,
            "choices": [choice],
            "usage": usage,
        }
        truth["headers_ns"] = truth["end_ns"] = time.monotonic_ns()
        return web.Response(body=orjson.dumps(answer), content_type="application/json")
