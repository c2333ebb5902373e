"""The embedded target: the cached tiny model and `transformers serve` on the CPU.

One model write and one server start serve the whole module (~25 s on 2 cores).
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import socket

import pytest

from cputax.errors import CputaxError
from cputax.targets import local

HAVE_LOCAL = all(importlib.util.find_spec(m) is not None for m in local.LOCAL_MODULES)
needs_local = pytest.mark.skipif(not HAVE_LOCAL, reason=f"needs the [local] extra: {local.INSTALL_HINT}")


def slow_local(test):
    """Marks for a test that writes the model or runs the server."""
    return pytest.mark.local(pytest.mark.slow(needs_local(test)))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cputax-cache")


@pytest.fixture(scope="module")
def server(cache_dir):
    with local.LocalServer(cache_dir=cache_dir) as srv:
        yield srv


def _stream_chat(srv: local.LocalServer, body: dict) -> list[dict]:
    """The data: payloads of one streamed chat completion, in order."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    try:
        conn.request("POST", local.CHAT_PATH, body=json.dumps({**body, "stream": True}),
                     headers={"content-type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        return [json.loads(line[6:]) for line in resp
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]"]
    finally:
        conn.close()


def test_missing_extra_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(CputaxError, match=r"pip install torch==2\.13\.0 && pip install 'cputax\[local\]'"):
        local.check_local_extra()


@pytest.mark.local
@needs_local
def test_busy_port_fails_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(CputaxError, match="in use"):
            local.LocalServer(port=s.getsockname()[1], cache_dir=tmp_path).__enter__()
    assert not (tmp_path / "models").exists()


@slow_local
def test_ensure_model_is_written_once(cache_dir):
    path = local.ensure_model(cache_dir)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert local.ensure_model(cache_dir) == path
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left behind


@slow_local
def test_model_loads_and_covers_the_tokenizer(cache_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cputax.text.conversation import chat_template
    from cputax.text.tokenizer import load_tokenizer

    path = local.ensure_model(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size >= load_tokenizer().vocab_size == len(tok)
    assert tok.chat_template == chat_template()
    assert (tok.bos_token_id, tok.eos_token_id) == (model.config.bos_token_id, model.config.eos_token_id)
    assert model.generation_config.eos_token_id is None  # generation always runs to max_tokens
    assert not model.lm_head.weight[model.config.eos_token_id].any()  # EOS can never win greedy decoding
    with torch.no_grad():
        ids = tok("def main():\n    return 0\n", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


@slow_local
def test_lists_its_model(server):
    assert server.endpoint == f"http://127.0.0.1:{server.port}"
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", local.MODELS_PATH)
    names = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]
    conn.close()
    assert names == [server.model] == [str(server.model_dir)]


@slow_local
def test_streams_exactly_max_tokens(server):
    from cputax.text.conversation import prompt_tokens
    from cputax.text.tokenizer import load_tokenizer

    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "List the files in src/ and explain each one."}]
    events = _stream_chat(server, {"model": server.model, "messages": messages, "max_tokens": 16,
                                   "stream_options": {"include_usage": True}})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant"}  # role-only chunk first, sent with the headers
    content = [d["content"] for d in deltas if d.get("content")]
    assert len(content) == 16  # one non-empty text chunk per token
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 16
    assert last["usage"]["prompt_tokens"] == prompt_tokens(messages, None, load_tokenizer())


@slow_local
def test_stop_leaves_nothing(server):
    """Last in the module: stops the shared server (the fixture's exit is then a no-op)."""
    pid, port = server.pid, server.port
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again
