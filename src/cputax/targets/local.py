"""The embedded target: `transformers serve` on this CPU with a tiny random-weight Llama.

Why it exists: a real OpenAI-compatible server (FastAPI + uvicorn front end, chat
template, tokenization, continuous batching) that anyone can start without a GPU,
a download or a hub account, so `cputax run` has something honest to measure.

The model is written once into the user's cache: a LlamaForCausalLM with the
DeepSeek tokenizer's full 129,280-token vocabulary, random weights, and an LM head
that can only emit plain-text tokens (see `ensure_model`). Facts about
`transformers serve` (flags, endpoints, environment) are the data at the top.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cputax.errors import CputaxError

# --- the model -------------------------------------------------------------------------------
# Bump MODEL_VERSION whenever anything below changes what is written: it names the cache folder.
MODEL_VERSION = "v1"
MODEL_SEED = 20240611
# Tiny on purpose: on 2 CPU cores the cost is the 129k-row embedding and LM head, not the layers.
# fp32 beats bf16 about 2-4x on CPUs without AVX512-BF16 (measured on a 2-core EPYC).
MODEL_DIMS = {
    "vocab_size": 129280,  # the DeepSeek tokenizer's, added tokens included: every id is valid
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim 32
    "num_key_value_heads": 2,
    "max_position_embeddings": 131072,  # RoPE: costs nothing until used
    "tie_word_embeddings": False,  # the LM head is edited (below) without touching the embeddings
}
MODEL_DTYPE = "float32"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # id 0 in the DeepSeek vocabulary
EOS_TOKEN = "<｜end▁of▁sentence｜>"  # id 1
PAD_TOKEN = "<｜▁pad▁｜>"  # id 2
MODEL_MAX_LENGTH = MODEL_DIMS["max_position_embeddings"]

# --- the server --------------------------------------------------------------------------------
SERVE_COMMAND = "transformers"  # console script of the transformers package
# `transformers serve MODEL_DIR` pins the server to that local folder (FORCE_MODEL): it is
# loaded at start-up, never looked up on the hub, and requests must name it (or no model).
SERVE_FLAGS = (
    "--continuous-batching",
    "--device", "cpu",
    "--dtype", MODEL_DTYPE,
    "--log-level", "info",
)
# Continuous batching sizes its KV cache from *total RAM* on a CPU (90% of it) unless told:
# fix it. A block holds PAGE tokens for every layer; 1,100 blocks = 281,600 tokens, enough
# for 32 concurrent 8k-token prompts plus their output.
CB_FLAGS = (
    "--cb-num-blocks", "1100",
    "--cb-max-batch-tokens", "2048",
)
SERVE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
CHAT_PATH = "/v1/chat/completions"
START_TIMEOUT_S = 180.0
STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 30
INSTALL_HINT = "pip install torch==2.13.0 && pip install 'cputax[local]'"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cputax, else ~/.cache/cputax."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cputax"


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / f"tiny-llama-{MODEL_VERSION}"


def check_local_extra() -> None:
    """Raise a CputaxError naming the fix when the [local] extra is not installed."""
    missing = [m for m in ("torch", "transformers", "fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise CputaxError(f"the embedded target needs {', '.join(missing)}: {INSTALL_HINT}")
    if _serve_executable() is None:
        raise CputaxError(f"the `{SERVE_COMMAND}` command is not installed: {INSTALL_HINT}")


def _serve_executable() -> str | None:
    """The `transformers` script beside this interpreter (a venv need not be on PATH), else on PATH."""
    beside = Path(sys.executable).parent / SERVE_COMMAND
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(SERVE_COMMAND)


def ensure_model(cache_dir: Path | None = None) -> Path:
    """The model folder, written on first use (atomically: a temp folder renamed into place).

    Random weights make the model's output text arbitrary, so two edits keep the
    stream predictable for a load generator:
    - generation_config.json has no eos_token_id, so generation always runs to
      max_tokens (continuous batching then disables EOS); greedy decoding;
    - the LM head rows of special tokens and of tokens that do not decode to
      whole UTF-8 text on their own are zero. Greedy decoding picks the largest
      logit, which over ~126k random rows is always positive, so a zero row
      (logit 0) never wins: every generated token is one plain-text SSE chunk.
    """
    check_local_extra()
    target = model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_model(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from cputax.text.conversation import chat_template
    from cputax.text.tokenizer import default_tokenizer_path

    tok_path = default_tokenizer_path()
    raw = Tokenizer.from_file(str(tok_path))
    if raw.get_vocab_size() > MODEL_DIMS["vocab_size"]:
        raise CputaxError(f"{tok_path} has {raw.get_vocab_size()} tokens, more than the model's vocabulary")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(folder)

    ids = {name: raw.token_to_id(tok) for name, tok in
           (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))}
    config = LlamaConfig(
        **MODEL_DIMS,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        dtype=MODEL_DTYPE,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config).to(getattr(torch, MODEL_DTYPE)).eval()
    with torch.no_grad():
        model.lm_head.weight[_unemittable_ids(raw, config.vocab_size)] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"], do_sample=False,
    )
    model.save_pretrained(folder, safe_serialization=True)


def _unemittable_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids the LM head must never pick: special/added tokens, ids past the tokenizer, and
    tokens that decode to nothing or to part of a UTF-8 character (they would stream no text)."""
    added = set(tokenizer.get_added_tokens_decoder())
    bad = [i for i in range(vocab_size) if i in added or i >= tokenizer.get_vocab_size()]
    for i in range(tokenizer.get_vocab_size()):
        if i not in added:
            text = tokenizer.decode([i], skip_special_tokens=False)
            if not text or "\ufffd" in text:
                bad.append(i)
    return sorted(set(bad))
