"""ShardLoader on damaged shard directories: a one-line error naming the file when the loader is made."""

import json

import numpy as np
import pytest

from pyllm.data.loader import ShardLoader
from pyllm.data.shards import FORMAT


@pytest.fixture
def shard_dir(tmp_path):
    """Two train shards and one val shard of uint16 tokens (vocab 50), written by hand."""
    entries = []
    for name, split, n in (("shard_00000", "train", 300), ("shard_00001", "train", 200), ("val_00000", "val", 100)):
        (np.arange(n, dtype="<u2") % 50).tofile(tmp_path / f"{name}.bin")
        np.array([0, n // 2], dtype="<u8").tofile(tmp_path / f"{name}.idx")
        entries.append({"file": f"{name}.bin", "index_file": f"{name}.idx", "split": split, "tokens": n})
    manifest = {"format": FORMAT, "dtype": "uint16", "vocab_size": 50, "eos_id": 0, "shards": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _edit_manifest(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


DAMAGE = {
    "truncated shard": (lambda d: (d / "shard_00001.bin").write_bytes((d / "shard_00001.bin").read_bytes()[:100]),
                        ValueError, r"shard_00001.bin: 100 bytes, but manifest.json says 200 uint16 tokens"),
    "odd byte count": (lambda d: (d / "shard_00001.bin").write_bytes((d / "shard_00001.bin").read_bytes() + b"x"),
                       ValueError, r"shard_00001.bin: 401 bytes"),
    "missing index": (lambda d: (d / "shard_00001.idx").unlink(), FileNotFoundError, r"shard_00001.idx: missing"),
    "no dtype": (lambda d: _edit_manifest(d, lambda m: m.pop("dtype")), ValueError,
                 r"manifest.json: no 'dtype' field"),
    "invalid JSON": (lambda d: (d / "manifest.json").write_text('{"format": '), ValueError,
                     r"manifest.json: not valid JSON \(line 1"),
    "shard without a token count": (lambda d: _edit_manifest(d, lambda m: m["shards"][0].pop("tokens")), ValueError,
                                    r"manifest.json: 'shards' must be a list of entries"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_shard_directory_is_a_one_line_error_naming_the_file(shard_dir, damage):
    fn, error, message = DAMAGE[damage]
    fn(shard_dir)
    with pytest.raises(error, match=rf"^{shard_dir}/{message}") as e:
        ShardLoader(shard_dir, seq_len=8, batch_size=2)
    assert "\n" not in str(e.value)


def test_shards_of_a_larger_vocabulary_than_the_model_are_refused(shard_dir):
    """Token ids up to 49 would index past a 40-entry embedding (an IndexError deep in torch, mid-run)."""
    assert ShardLoader(shard_dir, seq_len=8, batch_size=2, vocab_size=50).next_batch()["input_ids"].max() < 50
    with pytest.raises(ValueError, match=r"manifest.json: the shards were made with a vocabulary of 50, the "
                                         r"model's has 40; use the tokenizer the shards were made with"):
        ShardLoader(shard_dir, seq_len=8, batch_size=2, vocab_size=40)
