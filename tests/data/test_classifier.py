"""The trained quality classifier: learns good vs garbled text, drops by score threshold."""

import json
import random

import pytest

from pyllm.data.classifier import (ClassifierConfig, QualityClassifier, featurize, garble, load_examples,
                                   split_holdout, train_classifier)
from pyllm.data.stdlib import iter_stdlib_documents


def _examples():
    rng = random.Random(0)
    # paragraphs of the pydoc topics: a few hundred real prose examples
    good = [p for d in iter_stdlib_documents(sources=False) for p in d.text.split("\n\n") if len(p.split()) >= 40]
    return good + [garble(t, rng) for t in good], [1] * len(good) + [0] * len(good)


def test_features_are_normalised_hashed_ngrams():
    idx, val = featurize("the cat sat on the mat", hash_bits=12)
    assert idx.max() < 4096 and len(idx) == len(set(idx.tolist()))
    assert abs(float((val ** 2).sum()) - 1.0) < 1e-5
    assert len(featurize("", 12)[0]) == 0


def test_learns_good_versus_garbled_on_held_out_text():
    texts, labels = _examples()
    cfg = ClassifierConfig(epochs=15, seed=0)
    tr_x, tr_y, te_x, te_y = split_holdout(texts, labels, 0.3, seed=0)
    model = QualityClassifier.train(tr_x, tr_y, cfg)
    accuracy = sum((model.score(t) >= 0.5) == bool(y) for t, y in zip(te_x, te_y)) / len(te_x)
    assert accuracy >= 0.8
    # deterministic: same examples and seed -> same weights
    assert (QualityClassifier.train(tr_x, tr_y, cfg).weights == model.weights).all()


def test_train_file_and_bad_lines(tmp_path):
    texts, labels = _examples()
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, labels)))
    model, metrics = train_classifier(ClassifierConfig(train_file=str(path), epochs=10))
    assert metrics["holdout_accuracy"] >= 0.75 and metrics["train_examples"] + metrics["holdout_examples"] == len(texts)
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_examples(tmp_path / "bad.jsonl")
    (tmp_path / "one.jsonl").write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(ValueError, match="both labels"):
        load_examples(tmp_path / "one.jsonl")


def test_config_validation():
    with pytest.raises(ValueError, match="threshold"):
        ClassifierConfig(threshold=1.5)
