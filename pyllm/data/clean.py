"""Cleaning: Unicode normalisation, control characters, whitespace, repaired encoding errors.

Each step is a pure function of the text; ``clean_document`` applies them in order and says what it
changed (counts for the report) or why it dropped the document. Indentation is never touched: code is
whitespace-sensitive, so only line endings, trailing spaces, odd space characters and runs of blank
lines are normalised.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pyllm.typecheck import check_fields

from .document import INVALID_BYTE, Document

# C0 and C1 control characters except tab and newline, plus invisible format characters that only
# break tokenisation (byte-order mark, zero-width space, soft hyphen).
# Lone surrogates (JSON can carry "\ud800") cannot be encoded as UTF-8 and go too.
_CONTROL = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0),
                              0xFEFF, 0x200B, 0x00AD, *range(0xD800, 0xE000)]}
# Exotic spaces (no-break, en/em, ideographic...) become a plain space.
_SPACES = {c: " " for c in [0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]}


@dataclass
class CleanConfig:
    normalization: str = "NFC"
    """Unicode normal form: "NFC" (canonical; keeps compatibility characters like 'ﬁ' and '²'),
    "NFKC" (also folds them, as many web pipelines do) or "none"."""
    invalid_bytes: str = "repair"
    """What to do with a document whose source had invalid UTF-8: "repair" (delete the bad bytes, which the
    readers decoded to ``pyllm.data.document.INVALID_BYTE``) or "drop" (drop the document)."""
    max_invalid_fraction: float = 0.01
    """Even under "repair", drop a document where more than this fraction of characters were invalid
    bytes (it was probably binary or in another encoding)."""
    max_blank_lines: int = 2
    """Runs of more blank lines than this are shortened to this many."""

    def __post_init__(self):
        check_fields(self, label="clean")
        if self.normalization not in ("NFC", "NFKC", "none"):
            raise ValueError(f"clean.normalization={self.normalization!r}: use 'NFC', 'NFKC' or 'none'")
        if self.invalid_bytes not in ("repair", "drop"):
            raise ValueError(f"clean.invalid_bytes={self.invalid_bytes!r}: use 'repair' or 'drop'")
        if not 0.0 <= self.max_invalid_fraction <= 1.0:
            raise ValueError(f"clean.max_invalid_fraction={self.max_invalid_fraction}: must be in [0, 1]")
        if self.max_blank_lines < 0:
            raise ValueError(f"clean.max_blank_lines={self.max_blank_lines}: must be >= 0")


def normalize_unicode(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def remove_control_chars(text: str) -> str:
    return text.translate(_CONTROL)


def normalize_whitespace(text: str, max_blank_lines: int) -> str:
    """Unix line endings, plain spaces, no trailing spaces, at most ``max_blank_lines`` blank lines in a
    row, no leading/trailing blank lines. Leading indentation is kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_SPACES)
    # per line, not re.sub("[ \t]+$"): the regex retries a long run of spaces inside a line from each space in it
    text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = re.sub(r"\n{%d,}" % (max_blank_lines + 2), "\n" * (max_blank_lines + 1), text)
    return text.strip("\n")


def clean_document(doc: Document, cfg: CleanConfig) -> tuple[Document | None, str | None, dict]:
    """(cleaned document or None, drop reason or None, counts of what changed)."""
    changes = {}
    text = doc.text
    bad = int(doc.meta.get("invalid_bytes", 0))
    if bad:
        if cfg.invalid_bytes == "drop":
            return None, "invalid_utf8", changes
        if bad > cfg.max_invalid_fraction * max(len(text), 1):
            return None, "too_many_invalid_bytes", changes
        # exactly the bytes the reader could not decode: genuine U+FFFD in the input stay
        text = text.replace(INVALID_BYTE, "")
        changes["invalid_bytes_repaired"] = bad
    stripped = remove_control_chars(text)
    if len(stripped) != len(text):
        changes["control_chars_removed"] = len(text) - len(stripped)
    # after the removal: a zero-width space or soft hyphen between a letter and its accent hid the pair from NFC
    normalized = normalize_unicode(stripped, cfg.normalization)
    if normalized != stripped:
        changes["unicode_normalized_docs"] = 1
    text = normalize_whitespace(normalized, cfg.max_blank_lines)
    if not text.strip():
        return None, "empty_after_cleaning", changes
    return Document(doc.id, text, doc.source, doc.meta), None, changes
