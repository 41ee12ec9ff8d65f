"""Deduplication: exact (content hash) and near-duplicate (MinHash + LSH, Broder 1997; Leskovec et al.,
Mining of Massive Datasets ch. 3).

Near-duplicates. A document is the set of its word ``shingle_size``-grams (lower-cased words, see ``word_hashes``).
Its MinHash signature is, for each of ``num_perm`` hash functions h_i, the minimum of h_i over the
shingles; two signatures agree in a position with probability equal to the Jaccard similarity of the
sets. LSH splits the signature into ``bands`` bands of ``rows`` rows; documents that agree on a whole
band become candidates, which happens with probability 1 - (1 - J^rows)^bands, an S-curve whose
threshold is about (1/bands)^(1/rows). Candidates are confirmed when the fraction of equal signature
positions (the Jaccard estimate) reaches that threshold.

The hot loop is vectorised NumPy, no Python per word or shingle: words are hashed from one prefix sum over the bytes, shingle keys
are polynomial combinations of word hashes (uint64 arithmetic wraps), mixed with the splitmix64
finaliser, and the permutations are multiply-shift hashes h_i(x) = (a_i x + b_i) mod 2^64 >> 32 over a
(num_perm, shingles) block at a time.

Keeping one document per cluster is deterministic: documents arrive in input order and each one is
compared with the clusters seen before it; the first document of a cluster is kept and later members
are dropped as duplicates of it. Memory per kept document: its band keys and signature (bounded, no
document text is held).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pyllm.typecheck import check_fields

_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: polynomial base for byte -> word and word -> shingle keys
_POLY_INVERSE = pow(0x100000001B3, -1, 2**64)
_BLOCK = 4096  # shingles per (num_perm, block) product: bounds temporary memory to num_perm*block*8 bytes


@dataclass
class DedupConfig:
    exact: bool = True
    """Drop documents whose cleaned text is byte-identical to an earlier document."""
    near: bool = True
    """Drop near-duplicates found with MinHash + LSH."""
    shingle_size: int = 5
    """Words per shingle."""
    num_perm: int = 128
    """Hash functions in a signature (= bands * rows)."""
    bands: int = 16
    """LSH bands; rows = num_perm / bands. The similarity threshold is about (1/bands)^(1/rows):
    16 bands of 8 rows -> 0.707."""
    seed: int = 1
    """Seed of the permutation parameters (part of the result: keep it fixed for reproducibility)."""

    def __post_init__(self):
        check_fields(self, label="dedup")
        if self.shingle_size < 1:
            raise ValueError(f"dedup.shingle_size={self.shingle_size}: must be >= 1")
        if self.num_perm < 1 or self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"dedup.num_perm={self.num_perm} must be a positive multiple of "
                             f"dedup.bands={self.bands} (rows per band = num_perm / bands)")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands

    @property
    def threshold(self) -> float:
        """Estimated Jaccard similarity at which a pair becomes a candidate with probability ~1/2."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Bijective 64-bit mixer (Steele et al. 2014) so that structured keys become uniform bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _is_word_byte_table() -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    for c in b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_":
        table[c] = True
    table[0x80:] = True  # bytes of non-ASCII characters: letters of other scripts are words too
    return table


_WORD_BYTE = _is_word_byte_table()


_POWER_CACHE: dict[int, np.ndarray] = {}


def _powers(base: int, n: int) -> np.ndarray:
    """(n,) base^j mod 2^64 for j = 0..n-1 (uint64 products wrap); cached, grown by doubling."""
    table = _POWER_CACHE.get(base)
    if table is None or len(table) < n:
        size = max(n, 2 * len(table) if table is not None else 1 << 16)
        table = np.full(size, base, dtype=np.uint64)
        table[0] = 1
        with np.errstate(over="ignore"):
            table = np.cumprod(table, dtype=np.uint64)
        _POWER_CACHE[base] = table
    return table[:n]


def word_hashes(text: str) -> np.ndarray:
    """(words,) uint64 hashes of the lower-cased words of ``text``, with no Python loop per word.

    A word is a maximal run of ASCII letters, digits, '_' or non-ASCII bytes. Word [s, e) hashes to
    sum_{j in [s, e)} c_j P^(j-s) mod 2^64, computed for all words at once from one prefix sum
    G[i] = sum_{j<i} c_j P^j as (G[e] - G[s]) * P^-s (P is odd, so invertible mod 2^64).
    """
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    is_word = _WORD_BYTE[data]
    edges = np.flatnonzero(np.diff(is_word.astype(np.int8), prepend=0, append=0))
    starts, ends = edges[0::2], edges[1::2]  # (words,) byte offsets [start, end)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64)
    n = len(data)
    with np.errstate(over="ignore"):
        prefix = np.zeros(n + 1, dtype=np.uint64)
        np.cumsum((data.astype(np.uint64) + np.uint64(1)) * _powers(int(_POLY), n), out=prefix[1:])
        inverse = _powers(_POLY_INVERSE, n)
        return (prefix[ends] - prefix[starts]) * inverse[starts]


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """(n,) unique uint64 hashes of the word shingles of ``text`` (n >= 1 for any text with a word)."""
    word_hash = word_hashes(text)
    if len(word_hash) == 0:
        return word_hash
    k = min(shingle_size, len(word_hash))
    m = len(word_hash) - k + 1
    keys = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(word_hash)
        for j in range(k):  # polynomial key over k consecutive words, mod 2^64
            keys = keys * _POLY + mixed[j:j + m]
        return np.unique(_splitmix64(keys))


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(num_perm, 1) odd multipliers a and (num_perm, 1) offsets b of the multiply-shift hashes."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def minhash_signature(hashes: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm,) uint32 MinHash signature of shingle ``hashes`` (n,); all-ones for an empty set.

    h_i(x) = top 32 bits of (a_i x + b_i) mod 2^64; the shift is monotonic, so it is applied once to
    the 64-bit minimum instead of to every product.
    """
    lowest = np.full(a.shape[0], np.iinfo(np.uint64).max, dtype=np.uint64)
    buf = np.empty((a.shape[0], min(len(hashes), _BLOCK)), dtype=np.uint64)
    for start in range(0, len(hashes), _BLOCK):
        block = hashes[start:start + _BLOCK]
        out = buf[:, :len(block)]
        np.multiply(a, block[None, :], out=out)  # (num_perm, blk), wraps mod 2^64
        out += b
        np.minimum(lowest, out.min(axis=1), out=lowest)
    return (lowest >> np.uint64(32)).astype(np.uint32)


class MinHasher:
    """Signature of a text under one fixed configuration (picklable: workers build their own)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self.a, self.b = permutations(cfg.num_perm, cfg.seed)

    def __call__(self, text: str) -> np.ndarray:
        return minhash_signature(shingle_hashes(text, self.cfg.shingle_size), self.a, self.b)


class Deduplicator:
    """Online exact + near-duplicate detection over documents arriving in a fixed order.

    ``check(doc_id, digest, signature)`` returns None (keep: first of its cluster) or the drop reason.
    ``cluster_sizes`` counts members (kept + dropped) per cluster with at least one duplicate.
    """

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg
        self._exact: dict[bytes, int] = {}  # digest -> cluster id
        self._bands: list[dict[bytes, int]] = [{} for _ in range(cfg.bands)]  # band key -> cluster id
        self._signatures: dict[int, np.ndarray] = {}  # cluster id -> signature of its kept document
        self._size: Counter = Counter()
        self._next = 0

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        rows = self.cfg.rows
        raw = sig.tobytes()
        return [raw[i * rows * 4:(i + 1) * rows * 4] for i in range(self.cfg.bands)]

    def check(self, digest: bytes | None, signature: np.ndarray | None) -> str | None:
        if self.cfg.exact and digest is not None:
            cluster = self._exact.get(digest)
            if cluster is not None:
                self._size[cluster] += 1
                return "exact_duplicate"
        cluster = None
        keys = None
        if self.cfg.near and signature is not None:
            keys = self._band_keys(signature)
            candidates = sorted({c for band, key in zip(self._bands, keys) if (c := band.get(key)) is not None})
            for c in candidates:  # earliest cluster first: deterministic choice
                if np.mean(self._signatures[c] == signature) >= self.cfg.threshold:
                    cluster = c
                    break
        if cluster is not None:
            self._size[cluster] += 1
            for band, key in zip(self._bands, keys):  # members extend their cluster's reach
                band.setdefault(key, cluster)
            if digest is not None:
                self._exact.setdefault(digest, cluster)
            return "near_duplicate"
        cluster, self._next = self._next, self._next + 1
        self._size[cluster] += 1
        if digest is not None:
            self._exact[digest] = cluster
        if keys is not None:
            self._signatures[cluster] = signature
            for band, key in zip(self._bands, keys):
                band.setdefault(key, cluster)
        return None

    @property
    def cluster_sizes(self) -> list[int]:
        """Sizes of the clusters that had duplicates, largest first."""
        return sorted((n for n in self._size.values() if n > 1), reverse=True)


def jaccard(a: str, b: str, shingle_size: int) -> float:
    """Exact Jaccard similarity of the shingle sets of two texts (for tests and checks)."""
    ha, hb = shingle_hashes(a, shingle_size), shingle_hashes(b, shingle_size)
    union = len(np.union1d(ha, hb))
    return len(np.intersect1d(ha, hb)) / union if union else 1.0
