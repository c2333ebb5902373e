"""The calibration stub over real HTTP: vLLM's wire format, its side endpoints, its recorded
truth."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
import pytest

from cputax.client.stream import StreamingClient
from cputax.errors import CputaxError
from cputax.records import RequestRecord
from cputax.targets.stub import StubConfig, StubServer
from cputax.text.conversation import render_chat
from cputax.text.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "List the files in src/ and explain the layout."}]


def post_raw(config: StubConfig, path: str, body: dict) -> tuple[int, str, bytes, dict]:
    """POST with a bare aiohttp session, so the test sees the bytes as sent; plus the stub's
    truth."""
    with StubServer(config) as stub:

        async def go() -> tuple[int, str, bytes, dict]:
            async with aiohttp.ClientSession() as session:
                async with session.post(stub.url + path, json=body) as resp:
                    status, content_type, raw = (
                        resp.status,
                        resp.headers.get("Content-Type", ""),
                        await resp.read(),
                    )
                async with session.get(stub.url + "/stub/truth") as truth:
                    return status, content_type, raw, await truth.json()

        return asyncio.run(go())


def events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    parts = raw[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts)
    return [p[6:] for p in parts]


def test_chat_stream_is_shaped_like_vllm():
    body = {
        "model": "cputax-stub",
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, content_type, raw, _ = post_raw(
        StubConfig(output_tokens=8), "/v1/chat/completions", body
    )
    assert status == 200 and content_type.startswith("text/event-stream")
    *chunks, done = events(raw)
    assert done == b"[DONE]"
    role, *tokens, usage = [orjson.loads(c) for c in chunks]
    assert list(role) == ["id", "object", "created", "model", "choices"]
    assert role["object"] == "chat.completion.chunk" and role["model"] == "cputax-stub"
    assert role["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert len(tokens) == 3 and all(t["id"] == role["id"] for t in tokens)
    assert all(t["choices"][0]["delta"]["content"] for t in tokens)
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None, None, "length"]
    prompt = load_tokenizer().count(render_chat(MESSAGES))
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": prompt,
        "total_tokens": prompt + 3,
        "completion_tokens": 3,
    }


def test_completions_stream_has_no_role_chunk_and_no_usage_unless_asked():
    body = {"prompt": "def add(a, b):", "stream": True}
    status, _, raw, _ = post_raw(StubConfig(output_tokens=4), "/v1/completions", body)
    chunks = [orjson.loads(c) for c in events(raw)[:-1]]
    assert status == 200 and len(chunks) == 4
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert all(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"  # stopped before any max_tokens


def test_truth_follows_the_absolute_deadlines():
    a, b, c, n = 30, 20, 5, 6
    config = StubConfig(
        headers_delay_ms=a, first_token_delay_ms=b, inter_token_delay_ms=c, output_tokens=n
    )
    _, _, raw, truth = post_raw(
        config, "/v1/chat/completions", {"messages": MESSAGES, "stream": True}
    )
    rid = orjson.loads(events(raw)[0])["id"]
    steps = truth[rid]
    ms = 1_000_000
    assert steps["headers_ns"] - steps["arrival_ns"] >= a * ms
    assert steps["first_token_ns"] - steps["arrival_ns"] >= (a + b) * ms
    assert steps["last_token_ns"] - steps["arrival_ns"] >= (a + b + (n - 1) * c) * ms
    assert steps["end_ns"] >= steps["last_token_ns"]


def test_non_streaming_answer_carries_usage():
    status, content_type, raw, _ = post_raw(
        StubConfig(output_tokens=5), "/v1/chat/completions", {"messages": MESSAGES}
    )
    answer = orjson.loads(raw)
    assert status == 200 and content_type.startswith("application/json")
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"model": "other", "messages": MESSAGES}, 404, "The model `other` does not exist."),
        ({"model": "cputax-stub"}, 400, "`messages` is required"),
    ],
)
def test_bad_requests_get_vllm_error_bodies(body, status, message):
    got, _, raw, _ = post_raw(StubConfig(), "/v1/chat/completions", body)
    assert got == status and orjson.loads(raw)["error"]["message"] == message


def side_endpoints(config: StubConfig, calls):
    """Run `calls(client)` against a stub through StreamingClient's get_json/post_json/get_text."""
    with StubServer(config) as stub:

        async def go():
            async with StreamingClient(stub.url) as client:
                return await calls(client)

        return asyncio.run(go())


def test_models_health_and_tokenize():
    async def calls(client):
        models = await client.get_json("/v1/models")
        health = await client.get_text("/health")
        by_prompt = await client.post_json(
            "/tokenize", {"model": "cputax-stub", "prompt": "hello world"}
        )
        by_chat = await client.post_json(
            "/tokenize",
            {"model": "cputax-stub", "messages": MESSAGES, "add_generation_prompt": True},
        )
        return models, health, by_prompt, by_chat

    models, health, by_prompt, by_chat = side_endpoints(StubConfig(max_model_len=4096), calls)
    tokenizer = load_tokenizer()
    assert [m["id"] for m in models["data"]] == ["cputax-stub"]
    assert health[0] == 200
    status, answer = by_prompt
    assert status == 200 and answer["count"] == tokenizer.count("hello world") == len(
        answer["tokens"]
    )
    assert answer["max_model_len"] == 4096
    assert by_chat[1]["count"] == tokenizer.count(render_chat(MESSAGES))


def metric(text: str, name: str) -> float:
    found = re.search(
        rf'^{re.escape(name)}\{{engine="0",model_name="cputax-stub"\}} (\S+)$', text, re.M
    )
    assert found, name
    return float(found.group(1))


def test_metrics_expose_the_true_delays():
    config = StubConfig(
        headers_delay_ms=20, first_token_delay_ms=30, inter_token_delay_ms=2, output_tokens=4
    )

    async def calls(client):
        async def one(_):
            return await client.send(RequestRecord("m"), lambda: {"messages": MESSAGES})

        records = await asyncio.gather(*map(one, range(3)))
        return records, await client.get_text("/metrics")

    records, (status, text) = side_endpoints(config, calls)
    assert status == 200 and all(r.ok for r in records)
    assert metric(text, "vllm:time_to_first_token_seconds_count") == 3
    ttft = metric(text, "vllm:time_to_first_token_seconds_sum") / 3
    assert 0.050 <= ttft < 0.5
    assert (
        0.015 <= metric(text, "vllm:request_prefill_time_seconds_sum") / 3 < 0.5
    )  # B, less late headers
    assert metric(text, "vllm:request_queue_time_seconds_sum") == 0
    assert metric(text, "vllm:e2e_request_latency_seconds_count") == 3
    assert metric(text, "vllm:prompt_tokens_total") == 3 * records[0].prompt_tokens
    assert metric(text, "vllm:generation_tokens_total") == 12
    assert metric(text, "vllm:num_requests_running") == 0
    assert "process_cpu_seconds_total" in text


def test_get_json_raises_a_clear_error_on_http_errors():
    async def calls(client):
        return await client.get_json("/no/such/path")

    with pytest.raises(CputaxError, match="HTTP 404"):
        side_endpoints(StubConfig(), calls)


def test_unknown_fault_is_refused():
    with pytest.raises(CputaxError, match="unknown stub fault 'explode'"):
        StubConfig(fault="explode")


@pytest.mark.slow
def test_stub_in_a_child_process_answers_and_stops():
    with StubServer(StubConfig(output_tokens=2), process=True) as stub:
        child = stub._child
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", stub.url)

        async def go():
            async with StreamingClient(stub.url) as client:
                return await client.get_json("/v1/models")

        assert asyncio.run(go())["data"][0]["id"] == "cputax-stub"
    assert child is not None and child.poll() is not None
