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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import re
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
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
from cputax.errors import CputaxError
from cputax.servers import STUB
from cputax.text.conversation import render_chat
from cputax.text.tokenizer import load_tokenizer

FAULTS = (
    "http_500",  # 500 with a vLLM error body instead of a stream
    "error_event",  # after one token, a `data: {"error": ...}` line then [DONE], as vLLM on an engine error
    "malformed_sse",  # after one token, a line that is not SSE
    "non_json_data",  # after one token, `data: {not json`
    "reset_midstream",  # after one token, a TCP reset
    "truncated",  # after half the tokens, the stream ends cleanly without finish_reason, usage or [DONE]
    "no_usage",  # no usage chunk even when stream_options.include_usage asks for one
)
_WORDS = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ",",
          " then", " runs", " tests", " again", ".", "\n"]
_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_INLINE_COUNT_BYTES = 16 << 10  # smaller prompts are counted on the event loop, larger in a thread
_MS = 1_000_000
_TRUTH_KEPT = 100_000  # requests whose truth /stub/truth can still return
# vLLM 0.32's answer to `tools` with tool_choice "auto" (the default) on default flags
TOOL_CHOICE_REFUSED = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'


@dataclass
class StubConfig:
    """Injected delays (ms) and shape of each answer; `fault` breaks streams on purpose for tests."""

    headers_delay_ms: float = 0.0  # A: arrival -> response headers (vLLM: parse + template + tokenize)
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
    token_truth: bool = False  # keep every token's send time in the truth (calibration's inter-token error)

    def __post_init__(self) -> None:
        if self.fault is not None and self.fault not in FAULTS:
            raise CputaxError(f"unknown stub fault {self.fault!r}; choose from {', '.join(FAULTS)}")
        if min(self.headers_delay_ms, self.first_token_delay_ms, self.inter_token_delay_ms) < 0:
            raise CputaxError("stub delays must be >= 0 ms")
        if self.output_tokens < 1:
            raise CputaxError("the stub's output tokens must be >= 1")


def _error_body(status: int, message: str, kind: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


def _error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
    return web.Response(status=status, body=_error_body(status, message, kind),
                        content_type="application/json")


async def _sleep_until(deadline_ns: int) -> None:
    delay = deadline_ns - time.monotonic_ns()
    if delay > 0:
        await asyncio.sleep(delay / 1e9)


def _chunk_tail(choice: dict[str, Any]) -> bytes:
    return orjson.dumps([choice]) + b"}\n\n"


class _Metrics:
    """vLLM's metrics (names from its table in cputax.servers) with the stub's true timings,
    in a registry of its own."""

    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, as vLLM's API server
        names = ["model_name", "engine"]
        labels = {"model_name": model, "engine": "0"}
        table = STUB.metrics

        def histogram(quantity: str, doc: str) -> Any:
            return Histogram(table.histograms[quantity][0], doc, names, buckets=_BUCKETS,
                             registry=self.registry).labels(**labels)

        def gauge(quantity: str, doc: str) -> Any:
            return Gauge(table.gauges[quantity][0], doc, names, registry=self.registry).labels(**labels)

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
        arrival, first, last, end = (truth.get(k) for k in ("arrival_ns", "first_token_ns", "last_token_ns", "end_ns"))
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(tokens)
        if first is None or end is None:
            return
        self.e2e.observe((end - arrival) / 1e9)
        self.ttft.observe((first - arrival) / 1e9)
        self.queue.observe(0.0)
        self.prefill.observe((first - truth["headers_ns"]) / 1e9)
        self.decode.observe((last - first) / 1e9)


class _Stub:
    """The application: handlers plus what they share (tokenizer, metrics, truth, chunk bytes)."""

    def __init__(self, config: StubConfig):
        self.config = config
        self.tokenizer = load_tokenizer()
        self.metrics = _Metrics(config.model)
        self.truth: dict[str, dict[str, int]] = {}
        self._counts: OrderedDict[bytes, int] = OrderedDict()  # raw body -> prompt tokens
        self._model = orjson.dumps(config.model)
        self._chat = {
            reason: [_chunk_tail({"index": 0, "delta": {"content": w}, "logprobs": None,
                                  "finish_reason": reason, **({"stop_reason": None} if reason else {})})
                     for w in _WORDS]
            for reason in (None, "length", "stop")
        }
        self._text = {
            reason: [_chunk_tail({"index": 0, "text": w, "logprobs": None, "finish_reason": reason,
                                  "stop_reason": None}) for w in _WORDS]
            for reason in (None, "length", "stop")
        }
        self._role = _chunk_tail({"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None})

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
        return web.Response(body=orjson.dumps({"version": f"cputax-stub {__version__}"}),
                            content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.config.model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.config.model, "parent": None,
                "max_model_len": self.config.max_model_len}
        return web.Response(body=orjson.dumps({"object": "list", "data": [card]}),
                            content_type="application/json")

    async def metrics_page(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

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
            text = render_chat(body["messages"], body.get("tools"),
                               add_generation_prompt=body.get("add_generation_prompt", True))
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            return _error(400, "give `prompt` (a string) or `messages`")
        ids = await asyncio.get_running_loop().run_in_executor(
            None, lambda: self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids)
        return web.Response(body=orjson.dumps({"count": len(ids), "max_model_len": self.config.max_model_len,
                                               "tokens": ids, "token_strs": None}),
                            content_type="application/json")

    # -- request checks and prompt counting ----------------------------------

    async def _body(self, request: web.Request) -> tuple[dict[str, Any], bytes] | web.Response:
        """The JSON body and its bytes, or the error response vLLM would give."""
        key = self.config.api_key
        if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
            return web.Response(status=401, body=orjson.dumps({"error": "Unauthorized"}),
                                content_type="application/json")
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
        """Count like vLLM's front end; cached per body (calibration repeats one), big ones off the loop."""
        count = self._counts.get(raw)
        if count is None:
            if len(raw) < _INLINE_COUNT_BYTES:
                count = self._count(body, chat)
            else:
                count = await asyncio.get_running_loop().run_in_executor(None, self._count, body, chat)
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
        if chat and body.get("tools") and not self.config.auto_tool_choice and body.get("tool_choice", "auto") == "auto":
            return _error(400, TOOL_CHOICE_REFUSED)
        try:
            prompt_tokens = await self._prompt_tokens(body, raw, chat)
        except Exception as exc:  # a template or tokenizer failure is the client's bad input, as in vLLM
            return _error(400, f"could not tokenize the prompt: {exc}")
        cfg = self.config
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        n = min(cfg.output_tokens, limit) if isinstance(limit, int) and limit > 0 else cfg.output_tokens
        reason = "length" if n == limit else "stop"
        await _sleep_until(arrival + int(cfg.headers_delay_ms * _MS))
        if cfg.fault == "http_500":
            return _error(500, "stub fault: injected internal server error", "InternalServerError")
        # vLLM's response id is the prefix + the client's X-Request-Id when it sends one
        rid = (("chatcmpl-" if chat else "cmpl-")
               + (request.headers.get("x-request-id") or os.urandom(12).hex()))
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
                response = await self._stream(request, truth, rid, chat, n, reason,
                                              prompt_tokens if usage else None)
            else:
                response = await self._whole(truth, rid, chat, n, reason, prompt_tokens)
        finally:
            self.metrics.running.dec()
            self.truth[key] = self.truth[rid] = truth
            while len(self.truth) > _TRUTH_KEPT:  # nobody reads it: keep memory bounded
                del self.truth[next(iter(self.truth))]
            self.metrics.observe(truth, prompt_tokens, n)
        return response

    async def _stream(self, request: web.Request, truth: dict[str, int], rid: str, chat: bool,
                      n: int, reason: str, usage_prompt: int | None) -> web.StreamResponse:
        cfg = self.config
        kind = b"chat.completion.chunk" if chat else b"text_completion"
        head = (b'data: {"id":"' + rid.encode() + b'","object":"' + kind + b'","created":'
                + str(int(time.time())).encode() + b',"model":' + self._model + b',"choices":')
        tails = self._chat if chat else self._text
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                               "x-request-id": rid})
        first = truth["arrival_ns"] + int((cfg.headers_delay_ms + cfg.first_token_delay_ms) * _MS)
        step = int(cfg.inter_token_delay_ms * _MS)
        try:
            truth["headers_ns"] = time.monotonic_ns()
            await response.prepare(request)
            for k in range(n):
                await _sleep_until(first + k * step)
                words = tails[reason if k == n - 1 else None]
                chunk = head + words[k % len(words)]  # made before the stamp: the stamp is the send
                now = time.monotonic_ns()
                if k == 0:
                    truth["first_token_ns"] = now
                    if chat:  # vLLM's role-only chunk goes out with the first token
                        await response.write(head + self._role)
                elif k == 1 and cfg.fault in ("error_event", "malformed_sse", "non_json_data", "reset_midstream"):
                    return await self._break(request, response, cfg.fault)
                elif k == n // 2 and cfg.fault == "truncated":
                    await response.write_eof()
                    return response
                await response.write(chunk)
                truth["last_token_ns"] = now
                if cfg.token_truth:
                    truth["token_ns"].append(now)
            if usage_prompt is not None:
                usage = {"prompt_tokens": usage_prompt, "total_tokens": usage_prompt + n, "completion_tokens": n}
                await response.write(head + b'[],"usage":' + orjson.dumps(usage) + b"}\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            truth["end_ns"] = time.monotonic_ns()
        except ConnectionError:  # the client went away; the truth so far is kept
            truth["disconnected_ns"] = time.monotonic_ns()
        return response

    async def _break(self, request: web.Request, response: web.StreamResponse, fault: str) -> web.StreamResponse:
        if fault == "reset_midstream":
            transport = request.transport
            sock = transport.get_extra_info("socket") if transport else None
            if sock is not None:  # linger 0: close() sends RST, not FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if transport is not None:
                transport.abort()
            return response
        if fault == "error_event":
            await response.write(b"data: " + _error_body(500, "stub fault: injected engine error",
                                                         "InternalServerError") + b"\n\n")
        elif fault == "malformed_sse":
            await response.write(b"this line is not server-sent events\n\n")
        else:
            await response.write(b"data: {not json\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _whole(self, truth: dict[str, int], rid: str, chat: bool, n: int, reason: str,
                     prompt_tokens: int) -> web.Response:
        """A non-streamed answer, sent when the last token would have been."""
        cfg = self.config
        first = truth["arrival_ns"] + int((cfg.headers_delay_ms + cfg.first_token_delay_ms) * _MS)
        truth["first_token_ns"] = first
        truth["last_token_ns"] = first + (n - 1) * int(cfg.inter_token_delay_ms * _MS)
        await _sleep_until(truth["last_token_ns"])
        text = "".join(_WORDS[k % len(_WORDS)] for k in range(n))
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason, "stop_reason": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n}
        answer = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                  "created": int(time.time()), "model": cfg.model, "choices": [choice], "usage": usage}
        truth["headers_ns"] = truth["end_ns"] = time.monotonic_ns()
        return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def _start(config: StubConfig, host: str, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(_Stub(config).app(), access_log=None, handle_signals=False)
    await runner.setup()
    # A deep backlog: 256 clients connecting at once must not wait for SYN retries.
    site = web.TCPSite(runner, host, port, backlog=4096)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise CputaxError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    bound_host, bound_port = runner.addresses[0][:2]
    return runner, f"http://{bound_host}:{bound_port}"


def _describe(config: StubConfig) -> str:
    return (f"headers {config.headers_delay_ms:g} ms, first token +{config.first_token_delay_ms:g} ms, "
            f"every {config.inter_token_delay_ms:g} ms, {config.output_tokens} tokens, model {config.model}")


def serve_stub(host: str, port: int, config: StubConfig) -> int:
    """Serve in the foreground until Ctrl-C; the first stdout line carries the URL (StubServer reads it)."""

    async def main() -> None:
        runner, url = await _start(config, host, port)
        # the heap of imports and set-up out of the collector's walks, as the client's
        # (client.heap): a full collection between a token's stamp and its write would
        # put the collector's pause into the truth
        gc.collect()
        gc.freeze()
        print(f"cputax stub: serving on {url} ({_describe(config)})", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


class StubServer:
    """Run the stub on host:port (0 = a free port) for the length of a `with` block; `.url` is its base URL.

    process=False (tests): a background thread with its own event loop, cheap to
    start, but it shares the GIL with the client. process=True (calibration): a
    child process (`python -m cputax.targets.stub CONFIG_JSON`), so the stub's
    Python work does not queue behind the client's; it still shares the CPUs.
    """

    def __init__(self, config: StubConfig | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 process: bool = False, start_timeout_s: float = 60.0):
        self.config = config or StubConfig()
        self.host = host
        self.port = port
        self.process = process
        self.start_timeout_s = start_timeout_s
        self.url = ""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StubServer:
        if self.process:
            self._start_process()
        else:
            self._start_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._child is not None:
            self._child.terminate()
            try:
                self._child.wait(10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()
            self._child = None
        if self._thread is not None:
            assert self._loop is not None and self._stop is not None
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join()
            self._thread = None

    def _start_thread(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                runner, self.url = await _start(self.config, self.host, self.port)
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await runner.cleanup()

        self._thread = threading.Thread(target=asyncio.run, args=(main(),), name="cputax-stub", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def _start_process(self) -> None:
        config = orjson.dumps({**dataclasses.asdict(self.config), "host": self.host, "port": self.port})
        self._child = subprocess.Popen([sys.executable, "-m", "cputax.targets.stub", config.decode()],
                                       stdout=subprocess.PIPE)
        assert self._child.stdout is not None
        ready, _, _ = select.select([self._child.stdout], [], [], self.start_timeout_s)
        line = self._child.stdout.readline().decode() if ready else ""
        found = re.search(r"http://\S+", line)
        if not found:
            code = self._child.wait(5) if not line else self._child.poll()  # EOF: it is exiting
            self.__exit__()
            why = (f"exited with code {code} (its error is above)" if code is not None
                   else f"printed no URL within {self.start_timeout_s:g} s (got {line.strip()!r})")
            raise CputaxError(f"the stub process {why}")
        self.url = found.group(0)


def _child_main(settings_json: str) -> int:
    """Entry point of StubServer(process=True): the settings come as one JSON argument."""
    settings = orjson.loads(settings_json)
    try:
        return serve_stub(settings.pop("host"), settings.pop("port"), StubConfig(**settings))
    except CputaxError as exc:
        print(f"cputax stub: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
