"""BPE training: byte-level, pyllm's special tokens, standard tokenizer.json, deterministic."""

import json

import pytest

from pyllm.data.bpe import TokenizerConfig, train_bpe
from pyllm.data.stdlib import iter_stdlib_documents
from pyllm.tokenizer import SPECIAL_TOKENS, HFTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def texts():
    return [d.text for d in iter_stdlib_documents(sources=False)]


def test_train_save_load_round_trip(texts, tmp_path):
    tok = train_bpe(iter(texts), TokenizerConfig(vocab_size=600), tmp_path / "a")
    assert tok.vocab_size == 600
    spec = json.loads((tmp_path / "a" / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
    again = HFTokenizer.from_file(tmp_path / "a" / "tokenizer.json")
    assert isinstance(load_tokenizer(tmp_path / "a"), HFTokenizer)
    for special in SPECIAL_TOKENS:
        assert again.token_id(special) < 600
    sample = "def f(x):\n    return x  # caf\u00e9 \u4e2d\u6587 \U0001f600 <|endoftext|>"
    ids = again.encode(sample)
    assert again.decode(ids) == sample  # byte-level: any text round-trips
    assert again.eos_id not in ids  # a special token's text inside a document is plain text
    assert len(ids) < len(sample.encode())  # merges were learned


def test_deterministic(texts, tmp_path):
    train_bpe(iter(texts), TokenizerConfig(vocab_size=400), tmp_path / "a")
    train_bpe(iter(texts), TokenizerConfig(vocab_size=400), tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size"):
        TokenizerConfig(vocab_size=100)


def test_vocab_too_large_is_rejected_before_training():
    # the trainer allocates per requested entry: 2e9 aborted the process from Rust asking for 141 GB
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size=2000000000: must be in \[261, 2\*\*24\]"):
        TokenizerConfig(vocab_size=2_000_000_000)
    assert TokenizerConfig(vocab_size=2**24).vocab_size == 2**24
