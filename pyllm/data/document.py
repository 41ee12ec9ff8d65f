"""The unit every data stage passes along: one document's text plus where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

# What a reader decodes each invalid UTF-8 byte to: a noncharacter, which Unicode reserves for internal use, so
# the cleaning stage can delete exactly the invalid bytes (a U+FFFD could also be a genuine one in the input).
INVALID_BYTE = "\ufdd0"


@dataclass
class Document:
    """One document flowing through the pipeline.

    ``id`` is stable across runs (e.g. ``"stdlib:json/__init__.py"`` or ``"data.jsonl:17"``) so that
    deterministic choices (which duplicate to keep, shard order) and error reports can name it.
    """

    id: str
    text: str
    source: str  # the file, URL or built-in corpus it was read from
    meta: dict = field(default_factory=dict)
