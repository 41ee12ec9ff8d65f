"""Tokenizers: round trips, special tokens, save/load, errors."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pyllm.tokenizer import SPECIAL_TOKENS, ByteTokenizer, CharTokenizer, HFTokenizer, load_tokenizer

TEXT = "Grüße, 世界! tabs\tand\nnewlines <|endoftext|> stay text"


def tiny_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainer)
    return tok


def test_byte_round_trip_and_specials(tmp_path):
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))  # special strings inside text are plain bytes
    assert tok.decode(ids) == TEXT
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert tok.eos_id == tok.pad_id == tok.token_id("<|endoftext|>") == 256
    assert tok.decode(tok.encode("hi") + [tok.token_id("<|user|>")] + tok.encode("é")) == "hi<|user|>é"
    assert tok.decode([104, 999]) == "h\ufffd"  # an id outside the vocabulary shows, it is not dropped
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_char_round_trip_and_errors(tmp_path):
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw" and tok.vocab_size == 8 + len(SPECIAL_TOKENS)
    ids = tok.encode("hello")
    assert tok.decode(ids) == "hello"
    assert tok.token_id("<|end|>") == 8 + SPECIAL_TOKENS.index("<|end|>")
    with pytest.raises(ValueError, match="character 'z' is not in this character-level vocabulary"):
        tok.encode("zoo")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert isinstance(again, CharTokenizer) and again.chars == tok.chars and again.encode("world") == tok.encode("world")


def test_hf_round_trip_specials_and_save(tmp_path):
    tok = HFTokenizer(tiny_bpe())
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT  # byte-level BPE: any text round-trips
    assert tok.eos_id not in ids  # "<|endoftext|>" in the text is not the special token
    assert all(tok.token_id(s) is not None for s in SPECIAL_TOKENS)  # missing specials were added
    assert len({tok.token_id(s) for s in SPECIAL_TOKENS}) == len(SPECIAL_TOKENS)
    assert tok.decode([tok.token_id("<|assistant|>")]) == "<|assistant|>"
    tok.save(tmp_path / "a")
    again = load_tokenizer(tmp_path / "a")
    assert isinstance(again, HFTokenizer) and again.encode(TEXT) == ids and again.specials == tok.specials
    # a directory holding only a Hugging Face tokenizer.json loads too
    tiny_bpe().save(str(tmp_path / "bare.json"))
    (tmp_path / "b").mkdir()
    (tmp_path / "bare.json").rename(tmp_path / "b" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "b").encode("the fox") == tok.encode("the fox")


def test_errors(tmp_path):
    with pytest.raises(KeyError, match=r"no special token '<\|bos\|>'"):
        ByteTokenizer().token_id("<|bos|>")
    with pytest.raises(FileNotFoundError, match="no pyllm_tokenizer.json or tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "pyllm_tokenizer.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(ValueError, match="field 'kind'='wordpiece' is not one of"):
        load_tokenizer(tmp_path)


def test_hf_decode_shows_unknown_ids():
    tok = HFTokenizer(tiny_bpe())
    ids = tok.encode("the fox")
    # an id outside the vocabulary (a model's padded vocab rows) shows as U+FFFD, as in ByteTokenizer, not dropped
    unknown = tok.vocab_size + 10
    assert tok.decode(ids[:1] + [unknown] + ids[1:] + [-1]) == f"{tok.decode(ids[:1])}\ufffd{tok.decode(ids[1:])}\ufffd"


def test_char_and_byte_decode_ids_outside_their_range_as_unknown():
    # as HFTokenizer does: -1 wrapped to the last character in CharTokenizer and was a ValueError in ByteTokenizer
    assert CharTokenizer("abc").decode([0, -1, 3 + len(SPECIAL_TOKENS), 1]) == "a\ufffd\ufffdb"
    assert ByteTokenizer().decode([97, -1, 98, -300]) == "a\ufffdb\ufffd"


DAMAGED_META = {
    "not JSON": ("{", ValueError, r"pyllm_tokenizer.json: not valid JSON \(line 1"),
    "not an object": ("[1]", ValueError, r"pyllm_tokenizer.json: must hold a JSON object"),
    "char without chars": ('{"kind": "char"}', ValueError, r"pyllm_tokenizer.json: kind 'char' needs field 'chars'"),
    "hf without its file": ('{"kind": "hf"}', FileNotFoundError,
                            r"pyllm_tokenizer.json: kind 'hf' needs .*tokenizer.json, which does not exist"),
}


@pytest.mark.parametrize("damage", DAMAGED_META)
def test_damaged_tokenizer_files_are_one_line_errors_naming_the_file(tmp_path, damage):
    # were a raw JSONDecodeError, KeyError 'chars' and tokenizers' "No such file or directory (os error 2)"
    text, error, message = DAMAGED_META[damage]
    (tmp_path / "pyllm_tokenizer.json").write_text(text)
    with pytest.raises(error, match=rf"^{tmp_path}/{message}") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)


def test_damaged_hf_tokenizer_file_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tokenizer.json: not a readable tokenizers file \(.*\)$"):
        load_tokenizer(tmp_path)
