"""The embedded targets' model: a tiny random-weight Llama with the DeepSeek tokenizer,
written once into the user's cache (no download, no hub account).

Tiny on purpose: on a CPU the cost is the 129k-row embedding and LM head, not the two
layers. Every embedded server (vLLM, transformers serve) loads the same folder, so
their numbers compare.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from cputax.errors import CputaxError

__all__ = [
    "EOS_TOKEN",
    "MODEL_DTYPE",
    "default_cache_dir",
    "emulated_model_dir",
    "ensure_emulated_model",
    "ensure_model",
    "model_dir",
]

# Bump MODEL_VERSION whenever anything below changes what is written: it names the cache folder.
MODEL_VERSION = "v2"
MODEL_SEED = 20240611
# Tiny on purpose: on a CPU the cost is the 129k-row embedding and LM head (132 MB in fp32
# together), not the two layers. Weights are stored in fp32; each server loads them in its
# own dtype (transformers serve: fp32, 2-4x faster than bf16 on CPUs without AVX512-BF16).
# head_dim 64: vLLM's CPU attention kernels need a head size they support (64 works).
MODEL_DIMS = {
    "vocab_size": 129280,  # the DeepSeek tokenizer's, added tokens included: every id is valid
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,  # head_dim 64
    "num_key_value_heads": 1,
    "max_position_embeddings": 131072,  # RoPE: costs nothing until used
    "tie_word_embeddings": False,  # the LM head is edited (below) without touching the embeddings
}
MODEL_DTYPE = "float32"
BOS_TOKEN = "<｜begin▁of▁sentence｜>"  # id 0 in the DeepSeek vocabulary
EOS_TOKEN = "<｜end▁of▁sentence｜>"  # id 1
PAD_TOKEN = "<｜▁pad▁｜>"  # id 2

STALE_TEMP_S = 3600.0  # a model write takes seconds; older temp folders are leftovers


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/cputax, else ~/.cache/cputax."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cputax"


def model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / f"tiny-llama-{MODEL_VERSION}"


def ensure_model(cache_dir: Path | None = None) -> Path:
    """The model folder, written on first use (atomically: a temp folder renamed into place).

    Random weights make the output arbitrary, so two edits keep the stream
    predictable for a load generator:
    - generation_config.json has no eos_token_id (continuous batching then
      disables EOS) and greedy decoding: every request runs to max_tokens;
    - the LM head rows of special tokens and of tokens that do not decode to
      whole UTF-8 text on their own are zero. Greedy decoding takes the largest
      logit, which over ~126k random rows is always positive, so a zero row
      (logit 0) never wins: every generated token is one non-empty text chunk.
    """
    target = model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}-*"):  # left by a killed writer
        if time.time() - stale.stat().st_mtime > STALE_TEMP_S:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _write_model(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # else a concurrent writer won the race
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
        raise CputaxError(
            f"{tok_path} has {raw.get_vocab_size()} tokens, more than the model's vocabulary"
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tok_path),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_DIMS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template()
    tokenizer.save_pretrained(folder)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    # Older loaders (and other servers pointed at this folder) read the template from here.
    config_file = folder / "tokenizer_config.json"
    tok_config = json.loads(config_file.read_text())
    tok_config["chat_template"] = chat_template()
    config_file.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    ids = {
        name: raw.token_to_id(tok)
        for name, tok in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN))
    }
    config = LlamaConfig(
        **MODEL_DIMS,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
        dtype=MODEL_DTYPE,
    )
    torch.manual_seed(MODEL_SEED)
    model = LlamaForCausalLM(config).to(getattr(torch, MODEL_DTYPE)).eval()
    with torch.no_grad():
        model.lm_head.weight[_unemittable_ids(raw, config.vocab_size)] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"], do_sample=False
    )
    model.save_pretrained(folder, safe_serialization=True)


def _unemittable_ids(tokenizer, vocab_size: int) -> list[int]:
    """Ids the LM head must never pick: added/special tokens, ids past the tokenizer, and
    tokens that decode to nothing or to part of a UTF-8 character (they would stream no text)."""
    size = tokenizer.get_vocab_size()
    added = set(tokenizer.get_added_tokens_decoder())
    bad = added | set(range(size, vocab_size))
    for i in range(size):
        if i not in added:
            text = tokenizer.decode([i], skip_special_tokens=False)
            if not text or "\ufffd" in text:
                bad.add(i)
    return sorted(bad)


# --- the emulated GPU's model folder (cputax.emulation) -------------------------------------
# The tokenizer and chat template of the tiny model; a config naming the emulated
# architecture, one tiny attention layer (the host's KV layout: 256 bytes a token in bf16)
# and a 1024-row vocabulary (the logits the sampler sees each step stay small). No weights:
# vLLM loads it with --load-format dummy.
EMULATED_VERSION = "v1"
EMULATED_VOCAB = 1024
EMULATED_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
}
_COPIED = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def emulated_model_dir(cache_dir: Path | None = None) -> Path:
    name = f"emulated-gpu-{MODEL_VERSION}-{EMULATED_VERSION}"
    return (cache_dir or default_cache_dir()) / "models" / name


def ensure_emulated_model(cache_dir: Path | None = None) -> Path:
    """The emulated model's folder, written on first use beside the tiny model's (atomically)."""
    from cputax.emulation.plugin import ARCHITECTURE

    target = emulated_model_dir(cache_dir)
    if (target / "config.json").is_file():
        return target
    tiny = ensure_model(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in _COPIED:
            if (tiny / name).is_file():
                shutil.copy(tiny / name, tmp / name)
        tiny_config = json.loads((tiny / "config.json").read_text())
        config = {
            "architectures": [ARCHITECTURE],
            "model_type": "llama",
            "vocab_size": EMULATED_VOCAB,
            **EMULATED_DIMS,
            "max_position_embeddings": MODEL_DIMS["max_position_embeddings"],
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            **{k: tiny_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
            "torch_dtype": MODEL_DTYPE,
            "cputax_text_tokens": _word_ids(EMULATED_VOCAB),
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _word_ids(vocab: int) -> list[int]:
    """Ids below `vocab` that decode to a space and a word of three or more ASCII letters:
    what the emulated model streams, one whole word per token."""
    from tokenizers import Tokenizer

    from cputax.text.tokenizer import default_tokenizer_path

    raw = Tokenizer.from_file(str(default_tokenizer_path()))
    words = []
    for i in range(min(vocab, raw.get_vocab_size())):
        text = raw.decode([i], skip_special_tokens=False)
        if len(text) >= 4 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            words.append(i)
    return words
