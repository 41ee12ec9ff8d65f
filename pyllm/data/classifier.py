"""A trained quality classifier: logistic regression over hashed word n-grams (the fastText-style
"quality classifier" of GPT-3 / FineWeb-Edu, reduced to its linear core).

Features: lower-cased word unigrams and bigrams, hashed into ``2**hash_bits`` buckets (the hashing
trick, Weinberger et al. 2009), log(1 + count), L2-normalised per document. Word hashing reuses the
vectorised ``dedup.word_hashes``. Training is mini-batch SGD with L2 regularisation in NumPy, seeded,
so the same examples give the same weights. A document is kept if P(good) >= ``threshold``.

Labelled examples come from a JSONL file (``{"text": ..., "label": 1|0}``) or, for the built-in corpus,
from ``builtin_examples``: reviewed prose (pydoc topics and stdlib docstrings) as good, and
machine-garbled copies of it (words shuffled, characters scrambled, keyword spam) as bad.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyllm.typecheck import check_fields

from .dedup import _splitmix64, word_hashes
from .jsonl import read_json_lines


@dataclass
class ClassifierConfig:
    enabled: bool = True
    """Score documents and drop those below ``threshold``."""
    train_file: str | None = None
    """JSONL of labelled examples ({"text": str, "label": 1 good | 0 bad}); None = built-in examples."""
    threshold: float = 0.15
    """Keep a document if its predicted probability of being good is at least this."""
    hash_bits: int = 18
    """log2 of the number of hashed feature buckets."""
    epochs: int = 20
    """Passes of SGD over the training examples."""
    learning_rate: float = 2.0
    """SGD step size (features are L2-normalised, so O(1) is right)."""
    l2: float = 1e-5
    """L2 penalty on the weights."""
    holdout_fraction: float = 0.2
    """Fraction of the examples held out to report accuracy."""
    seed: int = 0
    """Seed of the example shuffle and the SGD order."""

    def __post_init__(self):
        if isinstance(self.train_file, Path):
            self.train_file = str(self.train_file)
        check_fields(self, label="classifier")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"classifier.threshold={self.threshold}: must be a probability in [0, 1]")
        if not 8 <= self.hash_bits <= 26:
            raise ValueError(f"classifier.hash_bits={self.hash_bits}: use 8..26")
        if self.epochs < 1 or self.learning_rate <= 0 or self.l2 < 0:
            raise ValueError("classifier: epochs must be >= 1, learning_rate > 0 and l2 >= 0")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"classifier.holdout_fraction={self.holdout_fraction}: must be in [0, 1)")


def featurize(text: str, hash_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices (k,) int64, values (k,) float32) of the hashed unigram + bigram features."""
    words = _splitmix64(word_hashes(text))
    if len(words) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    with np.errstate(over="ignore"):
        bigrams = _splitmix64(words[:-1] * np.uint64(31) + words[1:])
    mask = np.uint64((1 << hash_bits) - 1)
    buckets, counts = np.unique(np.concatenate([words, bigrams]) & mask, return_counts=True)
    values = np.log1p(counts).astype(np.float32)
    return buckets.astype(np.int64), values / np.linalg.norm(values)


class QualityClassifier:
    """Logistic regression on hashed n-grams; ``score(text)`` is P(good)."""

    def __init__(self, weights: np.ndarray, bias: float, hash_bits: int):
        self.weights, self.bias, self.hash_bits = weights, float(bias), hash_bits

    def score(self, text: str) -> float:
        idx, val = featurize(text, self.hash_bits)
        z = float(self.weights[idx] @ val) + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def train(cls, texts: list[str], labels: list[int], cfg: ClassifierConfig) -> "QualityClassifier":
        feats = [featurize(t, cfg.hash_bits) for t in texts]
        y = np.asarray(labels, dtype=np.float32)
        w = np.zeros(1 << cfg.hash_bits, dtype=np.float32)
        bias = 0.0
        rng = np.random.default_rng(cfg.seed)
        batch = 16
        for _ in range(cfg.epochs):
            order = rng.permutation(len(feats))
            for start in range(0, len(order), batch):
                rows = order[start:start + batch]
                idx = np.concatenate([feats[i][0] for i in rows])
                val = np.concatenate([feats[i][1] for i in rows])
                owner = np.repeat(np.arange(len(rows)), [len(feats[i][0]) for i in rows])
                # logits (rows,) = per-document sums of w[idx] * val
                z = np.bincount(owner, weights=w[idx] * val, minlength=len(rows)) + bias
                g = 1.0 / (1.0 + np.exp(-z)) - y[rows]  # d(log loss)/dz
                w *= 1.0 - cfg.learning_rate * cfg.l2
                # sum the gradient per distinct bucket first: one fancy-indexed update, no np.add.at
                buckets, where = np.unique(idx, return_inverse=True)
                w[buckets] -= (cfg.learning_rate / len(rows)) * np.bincount(where, weights=g[owner] * val)
                bias -= cfg.learning_rate * float(g.mean())
        return cls(w, bias, cfg.hash_bits)


def load_examples(path: str | Path) -> tuple[list[str], list[int]]:
    """Texts and 0/1 labels from a JSONL file; a bad line is a one-line error naming file and line."""
    texts, labels = [], []
    for lineno, rec in read_json_lines(path):
        try:
            text, label = rec["text"], int(rec["label"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}:{lineno}: expected {{\"text\": str, \"label\": 0|1}} ({e})") from None
        if label not in (0, 1) or not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: 'label' must be 0 or 1 and 'text' a string")
        texts.append(text)
        labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: needs examples of both labels (0 = bad, 1 = good)")
    return texts, labels


def garble(text: str, rng: random.Random) -> str:
    """A machine-garbled copy of ``text``: shuffled words, scrambled letters, or repeated keyword spam."""
    words = text.split()
    kind = rng.randrange(3)
    if kind == 0:
        rng.shuffle(words)
    elif kind == 1:
        words = ["".join(rng.sample(w, len(w))) for w in words]
    else:
        spam = rng.sample(words, min(len(words), 5)) or ["click"]
        words = [rng.choice(spam) for _ in range(max(len(words), 20))]
    return " ".join(words)


def builtin_examples(seed: int = 0, limit: int = 1500) -> tuple[list[str], list[int]]:
    """Good: pydoc topics and stdlib docstrings (reviewed prose); bad: garbled copies of them."""
    from .stdlib import iter_stdlib_documents, stdlib_docstrings

    good = [d.text for d in iter_stdlib_documents(sources=False)]
    good += [doc for _, doc in stdlib_docstrings() if len(doc.split()) >= 20]
    rng = random.Random(seed)
    good = rng.sample(good, min(limit, len(good)))
    bad = [garble(t, rng) for t in good]
    return good + bad, [1] * len(good) + [0] * len(bad)


def split_holdout(texts: list[str], labels: list[int], fraction: float, seed: int):
    """Shuffle once (seeded) and split into (train texts, train labels, test texts, test labels)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * (1 - fraction))
    pick = lambda ids, xs: [xs[i] for i in ids]  # noqa: E731
    return (pick(order[:cut], texts), pick(order[:cut], labels),
            pick(order[cut:], texts), pick(order[cut:], labels))


def train_classifier(cfg: ClassifierConfig) -> tuple[QualityClassifier, dict]:
    """Train on ``cfg.train_file`` (or the built-in examples); returns the model and held-out metrics."""
    texts, labels = load_examples(cfg.train_file) if cfg.train_file else builtin_examples(cfg.seed)
    tr_x, tr_y, te_x, te_y = split_holdout(texts, labels, cfg.holdout_fraction, cfg.seed)
    model = QualityClassifier.train(tr_x, tr_y, cfg)
    metrics = {"train_examples": len(tr_x), "holdout_examples": len(te_x)}
    if te_x:
        pred = [model.score(t) >= 0.5 for t in te_x]
        metrics["holdout_accuracy"] = float(np.mean([p == bool(y) for p, y in zip(pred, te_y)]))
    return model, metrics
