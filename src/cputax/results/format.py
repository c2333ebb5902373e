"""The one way a result file is written and read: JSON through msgspec, its format version
checked before the body is decoded, so an old or foreign file fails in one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np

from cputax.errors import CputaxError

__all__ = ["Versioned", "dump", "encode", "load", "to_builtins"]

T = TypeVar("T", bound=msgspec.Struct)


class Versioned(msgspec.Struct):
    """Only the version of a file, read before its body."""

    format_version: int = 1  # files written before versions existed are version 1


def _numpy(obj: Any) -> Any:
    """numpy scalars and arrays (analysis computes with them) as plain JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise NotImplementedError(f"cannot write {type(obj).__name__} to JSON")


_encoder = msgspec.json.Encoder(enc_hook=_numpy)


def encode(result: Any) -> bytes:
    """A result (a Struct, or builtins holding them) as indented JSON bytes."""
    return msgspec.json.format(_encoder.encode(result), indent=2)


def to_builtins(result: Any) -> Any:
    """A result as dicts and lists (for callers that hand it on as JSON, e.g. Ray)."""
    return msgspec.to_builtins(result, enc_hook=_numpy)


def dump(path: Path, result: Any) -> None:
    """Write atomically (temp file + rename), so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(encode(result))
    tmp.replace(path)


def load(path: Path, kind: type[T], accepts: tuple[int, ...], rebuild: str) -> T:
    """Read `path` as `kind` when its format_version is one of `accepts`; otherwise one
    CputaxError line naming the version found and `rebuild`, how to make a current one
    (e.g. "rebuild it with `cputax report DIR`")."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise CputaxError(f"{path}: no such file") from exc
    try:
        version = msgspec.json.decode(raw, type=Versioned).format_version
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CputaxError(f"{path}: not a {kind.__name__} file ({exc})") from exc
    if version not in accepts:
        known = ", ".join(map(str, accepts))
        raise CputaxError(
            f"{path}: {kind.__name__} format version {version}; this cputax reads "
            f"{known}: {rebuild}"
        )
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise CputaxError(f"{path}: {kind.__name__} format {version} but {exc}") from exc
