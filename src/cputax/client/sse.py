"""Server-sent events from an OpenAI-compatible server, turned into RequestRecord fields.

Everything here is synchronous and does no I/O, so the client can time it between
two clock reads without counting other requests' work.
`SSEDecoder` cuts bytes into lines whatever the network split; `StreamParser`
reads chat.completion.chunk / text_completion chunks the way vLLM sends them.
"""

from __future__ import annotations

from typing import Any

import orjson

from cputax.records import RequestRecord
from cputax.servers.vllm import TRACING as RESPONSE_METRICS

_NEWLINES = (b"\n", b"\r")
_OTHER_FIELDS = frozenset((b"event", b"id", b"retry"))  # legal SSE fields OpenAI servers never need
_DONE = b"[DONE]"
_SHOWN = 120  # bytes of a bad line quoted in an error


def response_phases(metrics: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """record.server from the final usage chunk's per-request metrics: queue, prefill (from
    scheduling) and decode, in ms. The response carries no arrival time, so no TTFT from
    arrival, e2e or HTTP in: those need the span."""
    phases: dict[str, Any] = dict.fromkeys(
        ("arrival_ns", "queue_ms", "prefill_ms", "decode_ms", "ttft_ms", "e2e_ms")
    )
    for name, key in RESPONSE_METRICS.response_fields.items():
        value = metrics.get(key)
        phases[name] = float(value) if isinstance(value, (int, float)) else None
    return {
        **phases,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "source": "response",
    }


class StreamError(Exception):
    """The stream broke the protocol or carried an error; the message goes into
    RequestRecord.error."""


def _quote(raw: bytes) -> str:
    text = raw[:_SHOWN].decode("utf-8", "replace")
    return repr(text + "...") if len(raw) > _SHOWN else repr(text)


class SSEDecoder:
    """Split a byte stream into complete lines (LF, CRLF or CR endings), keeping a partial
    last line.

    A line that spans many reads is collected as a list and joined once, so a
    100k-token line costs O(n), not O(n^2).
    """

    def __init__(self) -> None:
        self._pending: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        if not self._pending and data[-1:] == b"\n":  # the common read: whole events
            return data.splitlines()
        end = max(data.rfind(b"\n"), data.rfind(b"\r"))
        if end < 0:
            if data:
                self._pending.append(data)
            return []
        head = data[: end + 1]
        if self._pending:
            self._pending.append(head)
            head = b"".join(self._pending)
        rest = data[end + 1 :]
        self._pending = [rest] if rest else []
        # A CRLF cut between two reads leaves an empty line: harmless, blank lines are skipped.
        return head.splitlines()

    def flush(self) -> list[bytes]:
        """At end of stream: the last line, if it had no newline."""
        rest = b"".join(self._pending)
        self._pending = []
        return rest.splitlines()


def data_payload(line: bytes) -> bytes | None:
    """The payload of a `data:` line; None for blank lines, comments (`: keep-alive`) and
    other fields."""
    if not line or line[0] == 0x3A:  # ":" starts a comment
        return None
    if line.startswith(b"data:"):
        return line[6:] if line[5:6] == b" " else line[5:]
    if line.partition(b":")[0] in _OTHER_FIELDS:
        return None
    raise StreamError(f"malformed SSE line {_quote(line)}")


def error_message(obj: Any) -> str | None:
    """The message of an OpenAI/vLLM/FastAPI error object, or None if `obj` is not one."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err:
        return str(err)
    if obj.get("object") == "error":  # vLLM before 0.6 sent the ErrorResponse bare
        return str(obj.get("message"))
    if "detail" in obj:
        return str(obj["detail"])
    return None


def _bad(what: str, payload: bytes) -> StreamError:
    return StreamError(f"bad chunk: {what}: {_quote(payload)}")


def _chat_token(choice: dict[str, Any]) -> bool:
    """A delta carrying text: content, reasoning, or tool-call name/arguments. A role-only or
    empty delta is not. Raises TypeError on a delta of the wrong shape (the caller names
    the chunk)."""
    delta = choice.get("delta")
    if not delta:
        return False
    if not isinstance(delta, dict):
        raise TypeError("`delta` is not an object")
    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
        return True
    calls = delta.get("tool_calls") or ()
    if calls and not isinstance(calls, list):
        raise TypeError("`tool_calls` is not a list")
    for call in calls:
        if not isinstance(call, dict):
            raise TypeError("a tool call is not an object")
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise TypeError("a tool call's `function` is not an object")
        if function.get("arguments") or function.get("name"):
            return True
    return False


def _text_token(choice: dict[str, Any]) -> bool:
    return bool(choice.get("text"))


def _count(usage: dict[str, Any], name: str) -> int | None:
    value = usage.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise TypeError(f"`usage.{name}` is not a count")


class StreamParser:
    """Fill `record` from a chat (api="chat") or completions stream as its bytes arrive.

    Sets t_first_data, t_first_token, t_last_token, chunks (data lines with
    choices), prompt/output tokens from the usage chunk, or output tokens
    counted from token-carrying chunks when there is no usage. Raises
    StreamError on a malformed line, a non-JSON data line, an error object, or a chunk
    whose fields have the wrong types ("bad chunk: ...").
    """

    def __init__(self, record: RequestRecord, api: str = "chat", keep_chunks: bool = False) -> None:
        self.record = record
        # with keep_chunks: the (loop, kernel) stamps of every token chunk, in
        # record.extra["token_ns"] (calibration compares each gap with the stub's)
        self.token_ns: list[tuple[int, int | None]] | None = [] if keep_chunks else None
        if self.token_ns is not None:
            record.extra["token_ns"] = self.token_ns
        self.done = False  # [DONE] seen
        self.finished = False  # a choice with a finish_reason seen
        self._decoder = SSEDecoder()
        self._is_token = _chat_token if api == "chat" else _text_token
        self._token_chunks = 0
        self._kernel: int | None = None

    def feed(self, data: bytes, t: int, t_kernel: int | None = None) -> None:
        """Handle the bytes of one read, seen by the loop at monotonic time `t` (ns) and
        received by the kernel at `t_kernel` (None when unknown): every event this read
        completes gets these stamps."""
        self._kernel = t_kernel
        self._lines(self._decoder.feed(data), t)

    def eof(self, t: int) -> None:
        """The server closed the stream: take a last unterminated line, then require an end.

        vLLM ends with `data: [DONE]`; `transformers serve` never sends it and
        ends with a finish_reason chunk. A stream with neither was cut short.
        """
        self._lines(self._decoder.flush(), t)
        if not (self.done or self.finished):
            raise StreamError("stream ended before [DONE]")

    def _lines(self, lines: list[bytes], t: int) -> None:
        for line in lines:
            if not line:
                continue  # the blank line that ends an event
            if self.done:
                return  # vLLM sends nothing after [DONE]; ignore anything that comes
            payload = line[6:] if line.startswith(b"data: ") else data_payload(line)
            if payload is not None:
                self._data(payload, t)

    def _data(self, payload: bytes, t: int) -> None:
        record = self.record
        if payload == _DONE:
            self.done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise StreamError(f"non-JSON data line {_quote(payload)}") from None
        if not isinstance(obj, dict):
            raise StreamError(f"data line is not a JSON object: {_quote(payload)}")
        choices = obj.get("choices")
        message = (
            None if choices is not None else error_message(obj)
        )  # an error object has no choices
        if message is not None:
            raise StreamError(f"server error in stream: {message}")
        if choices is not None and not isinstance(choices, list):
            raise _bad("`choices` is not a list", payload)
        usage = obj.get("usage")
        if usage is not None and not isinstance(usage, dict):
            raise _bad("`usage` is not an object", payload)
        if record.t_first_data is None:
            record.t_first_data = t
            record.t_first_data_kernel = self._kernel
            if "id" in obj:
                record.extra["response_id"] = obj["id"]
        if choices:
            record.chunks += 1
            token = False
            for choice in choices:  # almost always one (n=1)
                if not isinstance(choice, dict):
                    raise _bad("a choice is not an object", payload)
                try:
                    token = self._is_token(choice) or token
                except TypeError as exc:
                    raise _bad(str(exc), payload) from None
                if choice.get("finish_reason"):
                    self.finished = True
            if token:
                if record.t_first_token is None:
                    record.t_first_token = t
                    record.t_first_token_kernel = self._kernel
                elif record.t_last_token == t and record.t_last_token_kernel == self._kernel:
                    record.shared_stamps += 1  # the same read as the token before it
                    if self._token_chunks == 1:  # that was the first: its stamp is this one's
                        record.extra["first_token_shared"] = True
                record.t_last_token = t
                record.t_last_token_kernel = self._kernel
                self._token_chunks += 1
                if self.token_ns is not None:
                    self.token_ns.append((t, self._kernel))
                if record.output_tokens_source != "usage":
                    record.output_tokens = self._token_chunks
                    record.output_tokens_source = "chunks"
        if usage:
            try:
                prompt, output = _count(usage, "prompt_tokens"), _count(usage, "completion_tokens")
            except TypeError as exc:
                raise _bad(str(exc), payload) from None
            record.prompt_tokens = prompt
            record.output_tokens = output
            record.output_tokens_source = "usage"
            metrics = obj.get(RESPONSE_METRICS.metrics_field)
            if isinstance(metrics, dict):  # vLLM --enable-per-request-metrics
                record.server = response_phases(metrics, usage)
