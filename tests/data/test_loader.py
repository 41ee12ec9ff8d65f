"""ShardLoader on damaged shard directories: a one-line error naming the file when the loader is made."""

import json
import warnings

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


@pytest.fixture
def stream_dir(tmp_path):
    """17 windows of 4 tokens (two train shards of 10 and 7) whose first tokens tell them apart: window w
    starts with token 4w (shard 0) or 100 + 4(w - 10) (shard 1)."""
    entries = []
    for name, tokens in (("shard_00000", np.arange(41)), ("shard_00001", np.arange(100, 129))):
        tokens.astype("<u2").tofile(tmp_path / f"{name}.bin")
        np.array([0], dtype="<u8").tofile(tmp_path / f"{name}.idx")
        entries.append({"file": f"{name}.bin", "index_file": f"{name}.idx", "split": "train", "tokens": len(tokens)})
    manifest = {"format": FORMAT, "dtype": "uint16", "vocab_size": 200, "eos_id": 0, "shards": entries}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def _first_token(window: int) -> int:
    return 4 * window if window < 10 else 100 + 4 * (window - 10)


def _stream(ranks: list[ShardLoader], steps: int) -> list[int]:
    """The first token of every window the ranks read in ``steps`` steps, in stream order: rank r's row j of
    step s is position s x B x W + r + j x W."""
    B, W = ranks[0].batch_size, len(ranks)
    out = [None] * (steps * B * W)
    for s in range(steps):
        for r, loader in enumerate(ranks):
            for j, token in enumerate(loader.next_batch()["input_ids"][:, 0].tolist()):
                out[s * B * W + r + j * W] = token
    return out


LAYOUTS = [(4, 1), (1, 1), (2, 2), (3, 2)]  # (batch size, ranks)


def test_the_windows_read_depend_on_the_count_alone_across_epochs(stream_dir):
    """48 windows (almost 3 epochs of 17) are the same, in the same order, for any batch size and number of
    ranks, and every epoch reads every window once. An epoch was a whole number of steps: 16 windows with
    batches of 4, 17 with batches of 1, 16 on 2 ranks (one window left out each time, a different one), so
    the windows trained after the first epoch depended on the micro-batch size and number of processes."""
    make = lambda B, r, W: ShardLoader(stream_dir, seq_len=4, batch_size=B, seed=5, rank=r, world_size=W)  # noqa: E731
    streams = {(B, W): _stream([make(B, r, W) for r in range(W)], 48 // (B * W)) for B, W in LAYOUTS}
    reference = streams[1, 1]
    for layout, stream in streams.items():
        assert stream == reference, layout
    everything = sorted(_first_token(w) for w in range(17))
    assert sorted(reference[:17]) == sorted(reference[17:34]) == everything  # every window once per epoch
    assert reference[:17] != reference[17:34]  # in a new order


def test_the_first_epoch_is_read_as_before(stream_dir):
    """Inside the first epoch rank r's k-th window is window perm[r + k x W] of the (seed, 0) permutation,
    as it always was: a run that never completed an epoch trains on the same data."""
    perm = np.random.default_rng([5, 0]).permutation(17)
    for B, W in LAYOUTS:
        for r in range(W):
            loader = ShardLoader(stream_dir, seq_len=4, batch_size=B, seed=5, rank=r, world_size=W)
            steps = 17 // (B * W)
            got = [t for _ in range(steps) for t in loader.next_batch()["input_ids"][:, 0].tolist()]
            assert got == [_first_token(w) for w in perm[r::W][:steps * B]], (B, W, r)


def test_resume_across_an_epoch_end_with_another_layout_and_older_states(stream_dir):
    make = lambda B, r=0, W=1: ShardLoader(stream_dir, seq_len=4, batch_size=B, seed=5, rank=r,  # noqa: E731
                                           world_size=W)
    reference = _stream([make(1)], 48)
    four = make(4)
    for _ in range(5):  # 20 windows: 3 into the second epoch
        four.next_batch()
    state = json.loads(json.dumps(four.state_dict()))
    assert (state["epoch"], state["windows"]) == (1, 3) and four.epoch == 1
    ranks = [make(2, r, 2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert _stream(ranks, 7) == reference[20:48]
    # states of earlier versions: (epoch, windows read in it) and (step, batch_size, world_size)
    for old, position in (({"epoch": 1, "windows": 8, "seed": 5, "split": "train", "seq_len": 4}, 25),
                          ({"epoch": 0, "step": 3, "batch_size": 2, "world_size": 2}, 12)):
        loader = make(1)
        loader.load_state_dict(old)
        assert _stream([loader], 4) == reference[position:position + 4]
    with pytest.raises(ValueError, match=r"20 windows read \(3 of them in epoch 1\) is not a whole number of "
                                         r"batches of 3 x 1 rank\(s\)"):
        make(3).load_state_dict(state)


def test_tokens_in_shard_tails_are_counted_and_warned_of(shard_dir):
    """Windows do not cross shards, so each shard's last (tokens - 1) % seq_len tokens are never read: counted,
    and a warning when they are more than 1% of the split (they were dropped silently)."""
    with pytest.warns(RuntimeWarning, match=r"10 of the 500 tokens of split 'train' \(2.0%\) are in shard tails"):
        loader = ShardLoader(shard_dir, seq_len=8, batch_size=2)
    assert loader.unread_tokens == (300 - 1) % 8 + (200 - 1) % 8
    read = sum(int(w) for w in loader._first_window[1:] - loader._first_window[:-1]) * 8 + len(loader.shards)
    assert loader.unread_tokens == 500 - read
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 2 + 1 of 500 unread: 0.6%, no warning
        assert ShardLoader(shard_dir, seq_len=99, batch_size=1).unread_tokens == (299 % 99) + (199 % 99)
        assert ShardLoader(shard_dir, seq_len=1, batch_size=1).unread_tokens == 0
