"""Deduplication: planted exact and near duplicates found, distinct documents kept, first one wins."""

import random

import numpy as np
import pytest

from pyllm.data.dedup import (DedupConfig, Deduplicator, MinHasher, content_hash, jaccard, shingle_hashes,
                              word_hashes)

VOCAB = [f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("ba", "de", "fi", "go", "hu")]


def _doc(rng, n=300):
    return " ".join(rng.choice(VOCAB) + str(rng.randrange(50)) for _ in range(n))


def _edit(text, fraction, rng):
    words = text.split()
    for i in rng.sample(range(len(words)), int(fraction * len(words))):
        words[i] = "EDITED" + str(i)
    return " ".join(words)


def test_word_hashes_match_a_per_word_reference():
    text = "Hello, hello WORLD  caf\u00e9_1 x"
    mask = (1 << 64) - 1

    def ref(word: bytes) -> int:  # sum c_j P^j mod 2^64 with c = byte + 1
        return sum((c + 1) * pow(0x100000001B3, j, 1 << 64) for j, c in enumerate(word)) & mask

    expected = [ref(w.encode()) for w in ["hello", "hello", "world", "caf\u00e9_1", "x"]]
    assert word_hashes(text).tolist() == expected
    assert len(word_hashes("... !!")) == 0


def test_threshold_formula():
    cfg = DedupConfig(num_perm=128, bands=16)
    assert cfg.rows == 8 and cfg.threshold == pytest.approx((1 / 16) ** (1 / 8))
    with pytest.raises(ValueError, match="multiple"):
        DedupConfig(num_perm=100, bands=16)


def test_signature_estimates_jaccard():
    rng = random.Random(0)
    hasher = MinHasher(DedupConfig(num_perm=256, bands=32))
    errors = []
    for frac in (0.01, 0.05, 0.1, 0.3):
        a = _doc(rng, 800)
        b = _edit(a, frac, rng)
        errors.append(np.mean(hasher(a) == hasher(b)) - jaccard(a, b, 5))
    # std of the estimate is <= sqrt(0.25 / 256) = 0.031 per pair
    assert max(abs(e) for e in errors) < 0.1
    assert np.array_equal(hasher("same text here"), MinHasher(DedupConfig(num_perm=256, bands=32))("same text here"))


def test_planted_duplicates_found_and_first_kept():
    rng = random.Random(1)
    base = [_doc(rng) for _ in range(40)]
    docs = list(base)
    planted = {}  # index of planted copy -> (index of its original, kind)
    for k, src in enumerate([3, 7, 11, 19]):
        docs.append(base[src])
        planted[len(docs) - 1] = (src, "exact_duplicate")
        near = _edit(base[src + 1], 0.02, rng)
        assert jaccard(near, base[src + 1], 5) > 0.75
        docs.append(near)
        planted[len(docs) - 1] = (src + 1, "near_duplicate")
    docs.append(_edit(base[25], 0.3, rng))  # too different: must be kept
    cfg = DedupConfig()
    hasher, dedup = MinHasher(cfg), Deduplicator(cfg)
    verdicts = [dedup.check(content_hash(d), hasher(d)) for d in docs]
    assert {i: v for i, v in enumerate(verdicts) if v} == {i: kind for i, (_, kind) in planted.items()}
    assert dedup.cluster_sizes == [2] * 8
    # the same run again gives the same verdicts (deterministic)
    again = Deduplicator(cfg)
    assert [again.check(content_hash(d), hasher(d)) for d in docs] == verdicts


def test_exact_only_and_near_only_modes():
    a = "the same words in the same order " * 10
    exact_only = Deduplicator(DedupConfig(near=False))
    assert [exact_only.check(content_hash(t), None) for t in (a, a, a + "x")] == [None, "exact_duplicate", None]
    near_cfg = DedupConfig(exact=False)
    near_only, hasher = Deduplicator(near_cfg), MinHasher(near_cfg)
    assert [near_only.check(None, hasher(t)) for t in (a, a)] == [None, "near_duplicate"]


def test_short_and_empty_texts():
    assert len(shingle_hashes("two words", 5)) == 1  # shorter than a shingle: one shingle of all words
    assert len(shingle_hashes("", 5)) == 0
    hasher = MinHasher(DedupConfig())
    assert (hasher("") == np.iinfo(np.uint32).max).all()


def test_agrees_with_datasketch_on_the_same_shingles():
    """Same shingles, different hash families: both estimate the same Jaccard within sampling error."""
    datasketch = pytest.importorskip("datasketch")
    import re

    def shingles(text):
        words = re.findall(r"[a-z0-9_\u0080-\U0010ffff]+", text.lower())
        return [" ".join(words[i:i + 5]).encode() for i in range(len(words) - 4)]

    rng = random.Random(2)
    hasher = MinHasher(DedupConfig(num_perm=256, bands=32))
    for frac in (0.02, 0.1, 0.25):
        a = _doc(rng, 600)
        b = _edit(a, frac, rng)
        ma, mb = datasketch.MinHash(num_perm=256), datasketch.MinHash(num_perm=256)
        ma.update_batch(shingles(a))
        mb.update_batch(shingles(b))
        exact = jaccard(a, b, 5)
        # the shingle sets are the same: datasketch's exact Jaccard on its shingles equals ours
        assert exact == pytest.approx(len(set(shingles(a)) & set(shingles(b))) / len(set(shingles(a)) | set(shingles(b))))
        assert abs(ma.jaccard(mb) - exact) < 0.15 and abs(np.mean(hasher(a) == hasher(b)) - exact) < 0.15
