"""Strict JSON-lines reading: every problem is an error that names the file and the line.

For inputs a run cannot do without (SFT and preference data, evaluation items, classifier labels, metrics
and results logs). The curation sources (``pyllm.data.sources``) read JSONL leniently instead: they log a
bad line and keep the rest.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Iterator
from pathlib import Path


class JsonLinesError(ValueError):
    """A line of a JSONL file cannot be read: ``file:line: problem``."""

    def __init__(self, path: str | Path, line: int, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}:{line}: {problem}")


def read_json_object(path: str | Path) -> dict:
    """The JSON object in the file ``path`` (a config, a manifest); text that is not UTF-8, not JSON or not
    an object is a one-line ValueError naming the file and where."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: must hold a JSON object, not {type(value).__name__}")
    return value


def strict_json(value):
    """``value`` with every nan / inf float replaced by None: json.dumps would write the bare NaN / Infinity
    tokens, which are not JSON (strict parsers reject the file)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def split_lines(f) -> Iterator[tuple[int, bytes]]:
    """(file offset, line without its end) of each line of the binary file ``f``. A line ends at "\\n",
    "\\r\\n" or a lone "\\r", as in Python's text mode (universal newlines), never at a Unicode line break
    that ``str.splitlines`` also splits at: a JSON string may hold a raw U+2028. A UTF-8 byte-order mark
    (Notepad, PowerShell 5) is not part of the first line. The one line splitter of every JSONL reader."""
    offset = 0
    for raw in f:  # a binary file splits at b"\n" only
        if offset == 0 and raw.startswith(codecs.BOM_UTF8):
            raw, offset = raw[len(codecs.BOM_UTF8):], len(codecs.BOM_UTF8)
        body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
        if b"\r" not in body:
            yield offset, body
        else:  # a lone "\r" (old Mac line ends) ends a line too
            start = offset
            for piece in body.split(b"\r"):
                yield start, piece
                start += len(piece) + 1
        offset += len(raw)


def read_json_lines(path: str | Path, objects: bool = True) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed value) of each non-blank line of a UTF-8 JSONL file, streamed.

    Bad UTF-8, bad JSON and, with ``objects``, a value that is not a JSON object raise ``JsonLinesError`` for
    the first bad line (the rows before it have been yielded); a missing file raises ``FileNotFoundError``.
    """
    with open(path, "rb") as f:
        for n, (offset, raw) in enumerate(split_lines(f), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # "byte N" counts from the start of the file, as elsewhere in pyllm
                raise JsonLinesError(path, n, f"not UTF-8 text (byte {offset + e.start})") from None
            if not line or line.isspace():  # not line.strip(): that would copy every (long) line
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise JsonLinesError(path, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if objects and not isinstance(value, dict):
                raise JsonLinesError(path, n, f"expected a JSON object, got {type(value).__name__}")
            yield n, value
