"""Heuristic quality filters in the style of Gopher (Rae et al. 2021, appendix A), C4 (Raffel et al.
2020) and FineWeb (Penedo et al. 2024).

A document is measured once (``measure``) and then checked rule by rule in a fixed order; the first
rule it breaks is its drop reason, so every dropped document is counted under exactly one rule.
Every threshold lives in ``QualityConfig``; ``None`` turns a rule off.

The defaults are set for a MIXED code and prose corpus (the built-in one is the standard library's
sources and docs): code has short lines, many symbols, few stop words and repetitive lines, so the
Gopher prose thresholds would drop nearly all of it. ``QualityConfig.gopher()`` gives the published
prose thresholds for web text. Repetition is measured on whitespace-separated words with n-gram keys
hashed in NumPy (no Python tuple per n-gram).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

import numpy as np

from pyllm.typecheck import check_fields, type_problem

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
TERMINAL_PUNCT = (".", "!", "?", '"', "'", "”")
BULLETS = ("*", "-", "•", "‣", "○", "▪", "▸", "–")
_POLY = np.uint64(1_000_003)  # multiplier of the polynomial n-gram hash (odd, so mixing is invertible)
_LOREM = re.compile(r"lorem ipsum", re.IGNORECASE)


@dataclass
class QualityConfig:
    min_words: int | None = 20
    """Drop documents with fewer whitespace-separated words (Gopher: 50)."""
    max_words: int | None = 200_000
    """Drop documents with more words (Gopher: 100,000)."""
    min_mean_word_length: float | None = 2.5
    """Drop if the mean word length in characters is below this (Gopher: 3)."""
    max_mean_word_length: float | None = 14.0
    """Drop if above this: long runs of identifiers, URLs, base64 or tables (Gopher: 10)."""
    max_symbol_word_ratio: float | None = 0.2
    """Drop if ('#' + '...' + '…') per word exceeds this (Gopher: 0.1); '#' is Python's comment sign."""
    max_bullet_line_fraction: float | None = 0.9
    """Drop if more than this fraction of lines start with a bullet (Gopher: 0.9)."""
    max_ellipsis_line_fraction: float | None = 0.3
    """Drop if more than this fraction of lines end with an ellipsis (Gopher: 0.3)."""
    min_alpha_word_fraction: float | None = 0.5
    """Drop if fewer words than this contain a letter (Gopher: 0.8; numeric tables fail it)."""
    min_stop_words: int | None = 2
    """Drop if fewer of Gopher's stop words (the, be, to, of, and, that, have, with) occur."""
    max_dup_line_fraction: float | None = 0.45
    """Drop if this fraction of non-blank lines are exact repeats of an earlier line (Gopher: 0.3)."""
    max_dup_line_char_fraction: float | None = 0.3
    """Drop if repeated lines hold this fraction of the characters (Gopher: 0.2)."""
    max_dup_paragraph_fraction: float | None = 0.3
    """Drop if this fraction of paragraphs (blank-line separated) repeat an earlier one (Gopher: 0.3)."""
    max_dup_paragraph_char_fraction: float | None = 0.2
    """Drop if repeated paragraphs hold this fraction of the characters (Gopher: 0.2)."""
    max_top_ngram_char_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16})
    """n -> drop if the most frequent word n-gram covers more than this fraction of word characters."""
    max_dup_ngram_char_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.4, 6: 0.38, 7: 0.36, 8: 0.34, 9: 0.32, 10: 0.3})
    """n -> drop if word n-grams that occur more than once cover more than this fraction of word
    characters (Gopher: 0.15 at n=5 down to 0.10 at n=10; code repeats itself more)."""
    min_punct_line_fraction: float | None = None
    """Drop if fewer lines than this end in terminal punctuation (FineWeb: 0.12; off for code)."""
    max_short_line_fraction: float | None = None
    """Drop if more lines than this are shorter than 30 characters (FineWeb: 0.67; off for code)."""
    drop_lorem_ipsum: bool = True
    """Drop placeholder text containing 'lorem ipsum' (C4)."""

    def __post_init__(self):
        check_fields(self, label="quality")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
                raise ValueError(f"quality.{f.name}={v}: thresholds must be >= 0 (or None to turn the rule off)")
        for name in ("max_top_ngram_char_fraction", "max_dup_ngram_char_fraction"):
            for n, frac in getattr(self, name).items():
                # JSON gives the keys as strings
                if not str(n).isdecimal() or int(n) < 1 or type_problem(frac, float) or not 0 <= frac <= 1:
                    raise ValueError(f"quality.{name}[{n}]={frac}: n must be >= 1 and the fraction in [0, 1]")
            setattr(self, name, {int(n): float(f) for n, f in getattr(self, name).items()})
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise ValueError(f"quality.min_words={self.min_words} > max_words={self.max_words}")

    @classmethod
    def fineweb(cls) -> "QualityConfig":
        """Gopher's thresholds plus FineWeb's line rules, for web prose."""
        return replace(cls.gopher(), min_punct_line_fraction=0.12, max_short_line_fraction=0.67)

    @classmethod
    def gopher(cls) -> "QualityConfig":
        """The published Gopher thresholds, meant for English web prose."""
        return cls(min_words=50, max_words=100_000, min_mean_word_length=3, max_mean_word_length=10,
                   max_symbol_word_ratio=0.1, min_alpha_word_fraction=0.8, max_dup_line_fraction=0.3,
                   max_dup_line_char_fraction=0.2,
                   max_dup_ngram_char_fraction={5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


def _dup_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen, dup, dup_chars = set(), 0, 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), dup_chars / max(sum(map(len, items)), 1)


def _ngram_keys(word_ids: np.ndarray, n: int) -> np.ndarray:
    """(m - n + 1,) uint64 polynomial hashes of the word n-grams of ``word_ids`` (m,)."""
    m = len(word_ids) - n + 1
    keys = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # wraps mod 2^64 by design
        keys = keys * _POLY + word_ids[j:j + m]
    return keys


def ngram_char_fractions(words: list[str], top_ns, dup_ns) -> dict[str, float]:
    """Gopher's repetition statistics over word n-grams, as fractions of the characters in words.

    top_ngram_{n}: characters of the most frequent n-gram times its count; dup_ngram_{n}: characters of
    words covered by any n-gram that occurs more than once (each word counted once).
    """
    out = {}
    if not words:
        return out
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), dtype=np.uint64, count=len(words))
    lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    total = lens.sum()
    csum = np.concatenate([[0], np.cumsum(lens)])
    for n in sorted(set(top_ns) | set(dup_ns)):
        if len(words) < n:
            out[f"top_ngram_{n}"] = out[f"dup_ngram_{n}"] = 0.0
            continue
        keys = _ngram_keys(ids, n)
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        if n in top_ns:
            best = np.argmax(counts)
            i = first[best]
            out[f"top_ngram_{n}"] = float((csum[i + n] - csum[i]) * counts[best] / total) if counts[best] > 1 else 0.0
        if n in dup_ns:
            starts = np.flatnonzero(counts[inverse] > 1)
            # coverage of words by repeated n-grams: +1 at each start, -1 n words later, prefix sum
            delta = np.bincount(starts, minlength=len(words) + 1) - np.bincount(starts + n, minlength=len(words) + 1)
            covered = np.cumsum(delta)[:len(words)] > 0
            out[f"dup_ngram_{n}"] = float(lens[covered].sum() / total)
    return out


def measure(text: str, cfg: QualityConfig) -> dict[str, float]:
    """Every statistic the rules look at."""
    words = text.split()
    lines = [ln for ln in text.split("\n") if ln.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    n_words = len(words)
    stats = {
        "words": n_words,
        "mean_word_length": sum(map(len, words)) / n_words if n_words else 0.0,
        "symbol_word_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(n_words, 1),
        "bullet_line_fraction": sum(ln.lstrip().startswith(BULLETS) for ln in lines) / max(len(lines), 1),
        "ellipsis_line_fraction": sum(ln.rstrip().endswith(("...", "…")) for ln in lines) / max(len(lines), 1),
        "alpha_word_fraction": sum(any(c.isalpha() for c in w) for w in words) / max(n_words, 1),
        "stop_words": sum(w.lower() in STOP_WORDS for w in words),
        "lorem_ipsum": float(bool(_LOREM.search(text))),
        "punct_line_fraction": sum(ln.rstrip().endswith(TERMINAL_PUNCT) for ln in lines) / max(len(lines), 1),
        "short_line_fraction": sum(len(ln.strip()) < 30 for ln in lines) / max(len(lines), 1),
    }
    stats["dup_line_fraction"], stats["dup_line_char_fraction"] = _dup_fractions(lines)
    stats["dup_paragraph_fraction"], stats["dup_paragraph_char_fraction"] = _dup_fractions(paragraphs)
    stats.update(ngram_char_fractions(words, cfg.max_top_ngram_char_fraction, cfg.max_dup_ngram_char_fraction))
    return stats


def failed_rule(stats: dict[str, float], cfg: QualityConfig) -> str | None:
    """Name of the first rule the document breaks, or None if it passes them all."""
    checks = [
        ("min_words", stats["words"], lambda v, t: v < t),
        ("max_words", stats["words"], lambda v, t: v > t),
        ("min_mean_word_length", stats["mean_word_length"], lambda v, t: v < t),
        ("max_mean_word_length", stats["mean_word_length"], lambda v, t: v > t),
        ("max_symbol_word_ratio", stats["symbol_word_ratio"], lambda v, t: v > t),
        ("max_bullet_line_fraction", stats["bullet_line_fraction"], lambda v, t: v > t),
        ("max_ellipsis_line_fraction", stats["ellipsis_line_fraction"], lambda v, t: v > t),
        ("min_alpha_word_fraction", stats["alpha_word_fraction"], lambda v, t: v < t),
        ("min_stop_words", stats["stop_words"], lambda v, t: v < t),
        ("max_dup_line_fraction", stats["dup_line_fraction"], lambda v, t: v > t),
        ("max_dup_line_char_fraction", stats["dup_line_char_fraction"], lambda v, t: v > t),
        ("max_dup_paragraph_fraction", stats["dup_paragraph_fraction"], lambda v, t: v > t),
        ("max_dup_paragraph_char_fraction", stats["dup_paragraph_char_fraction"], lambda v, t: v > t),
        ("min_punct_line_fraction", stats["punct_line_fraction"], lambda v, t: v < t),
        ("max_short_line_fraction", stats["short_line_fraction"], lambda v, t: v > t),
    ]
    for name, value, breaks in checks:
        threshold = getattr(cfg, name)
        if threshold is not None and breaks(value, threshold):
            return name
    for n, threshold in sorted(cfg.max_top_ngram_char_fraction.items()):
        if stats[f"top_ngram_{n}"] > threshold:
            return f"max_top_ngram_char_fraction_{n}"
    for n, threshold in sorted(cfg.max_dup_ngram_char_fraction.items()):
        if stats[f"dup_ngram_{n}"] > threshold:
            return f"max_dup_ngram_char_fraction_{n}"
    if cfg.drop_lorem_ipsum and stats["lorem_ipsum"]:
        return "lorem_ipsum"
    return None


def quality_check(text: str, cfg: QualityConfig) -> str | None:
    """Drop reason for ``text`` under ``cfg``, or None to keep it."""
    return failed_rule(measure(text, cfg), cfg)
