"""`cputax attribute FILE`: classify an existing py-spy raw or chrometrace file."""

from __future__ import annotations

from pathlib import Path

from cputax.analysis.attribution import attribute_file
from cputax.errors import CputaxError
from cputax.report.profiling import file_text
from cputax.results.format import encode

__all__ = ["attribute"]


def attribute(path: Path, server: str, rate: float | None, as_json: bool = False) -> int:
    """Classify one py-spy raw or chrometrace file and print the shares."""
    if not path.is_file():
        raise CputaxError(f"{path}: no such file")
    result = attribute_file(path, server, rate)
    if as_json:
        print(encode(result).decode())
    else:
        print(file_text(result))
    return 0
