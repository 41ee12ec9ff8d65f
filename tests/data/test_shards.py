"""Packing and loading: format, worker-count invariance, resume, deterministic loader, shards train."""

import hashlib
import json

import numpy as np
import pytest
import torch

from pyllm.data import shards as shards_mod
from pyllm.data.bpe import TokenizerConfig, train_bpe
from pyllm.data.loader import ShardLoader
from pyllm.data.shards import ShardConfig, pack_shards, read_manifest, split_of
from pyllm.data.stdlib import iter_stdlib_documents
from pyllm.tokenizer import load_tokenizer

CFG = ShardConfig(shard_tokens=20_000, val_fraction=0.1, batch_documents=8)


@pytest.fixture(scope="module")
def docs():
    return [(d.id, d.text) for d in iter_stdlib_documents(sources=False)]


@pytest.fixture(scope="module")
def tok_dir(docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_bpe((t for _, t in docs), TokenizerConfig(vocab_size=400), out)
    return out


@pytest.fixture(scope="module")
def packed(docs, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    manifest, info = pack_shards(iter(docs), tok_dir, out, CFG, {"test": 1}, workers=1)
    return out, manifest


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_manifest_index_and_documents(packed, docs, tok_dir):
    out, manifest = packed
    assert manifest == read_manifest(out)
    assert manifest["format"] == "pyllm-shards-v1" and manifest["dtype"] == "uint16"
    tok = load_tokenizer(out)  # the shard dir carries its tokenizer
    assert tok.vocab_size == manifest["vocab_size"] == 400 and manifest["eos_id"] == tok.eos_id
    expected = {"train": [], "val": []}
    for doc_id, text in docs:
        expected[split_of(doc_id, CFG.val_fraction)].append(text)
    assert expected["val"] and manifest["totals"]["val"]["documents"] == len(expected["val"])
    for split in ("train", "val"):
        got = []
        entries = [e for e in manifest["shards"] if e["split"] == split]
        assert len(entries) == manifest["totals"][split]["shards"]
        for e in entries:
            data = (out / e["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == e["sha256"]
            tokens = np.frombuffer(data, dtype="<u2")
            starts = np.frombuffer((out / e["index_file"]).read_bytes(), dtype="<u8")
            assert len(tokens) == e["tokens"] and len(starts) == e["documents"]
            assert e["tokens"] <= CFG.shard_tokens or e["documents"] == 1
            bounds = list(starts) + [len(tokens)]
            for s, t in zip(bounds[:-1], bounds[1:]):
                assert tokens[t - 1] == manifest["eos_id"]  # each document followed by eos
                got.append(tok.decode(tokens[s:t - 1]))
        assert got == expected[split]  # every document, in order, losslessly


def test_byte_identical_regardless_of_workers(packed, docs, tok_dir, tmp_path):
    out, _ = packed
    pack_shards(iter(docs), tok_dir, tmp_path, CFG, {"test": 1}, workers=2)
    assert _files(tmp_path) == _files(out)


def test_resume_does_not_redo_finished_shards(packed, docs, tok_dir, tmp_path, monkeypatch):
    out, manifest = packed
    original = shards_mod._Progress.record
    calls = {"n": 0}

    def crash_after_three(self, split, entry):
        original(self, split, entry)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(shards_mod._Progress, "record", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        pack_shards(iter(docs), tok_dir, tmp_path, CFG, {"test": 1}, workers=1)
    monkeypatch.setattr(shards_mod._Progress, "record", original)
    assert not (tmp_path / "manifest.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.bin")}
    assert len(finished) == 3

    written = []
    real_write = shards_mod.write_atomic
    monkeypatch.setattr(shards_mod, "write_atomic", lambda p, d: (written.append(p.name), real_write(p, d)))
    _, info = pack_shards(iter(docs), tok_dir, tmp_path, CFG, {"test": 1}, workers=1)
    assert info["resumed_shards"] == 3 and info["skipped_documents"] > 0
    rewritten = [n for n in written if n.endswith(".bin")]
    assert len(rewritten) == len(manifest["shards"]) - 3 and not set(rewritten) & set(finished)
    assert all((tmp_path / n).stat().st_mtime_ns == t for n, t in finished.items())
    assert _files(tmp_path) == _files(out)
    # a finished directory with the same config is reused, not rebuilt
    written.clear()
    pack_shards(iter(docs), tok_dir, tmp_path, CFG, {"test": 1}, workers=1)
    assert not [n for n in written if n.endswith(".bin")]


def test_uint32_holds_the_same_tokens(packed, docs, tok_dir, tmp_path):
    out, manifest = packed
    cfg = ShardConfig(**{**CFG.__dict__, "dtype": "uint32"})
    m32, _ = pack_shards(iter(docs), tok_dir, tmp_path, cfg, {"test": 1}, workers=1)
    assert m32["dtype"] == "uint32"
    first = manifest["shards"][0]["file"]
    assert (np.fromfile(tmp_path / first, dtype="<u4") == np.fromfile(out / first, dtype="<u2")).all()
    with pytest.raises(ValueError, match="uint16"):
        shards_mod.token_dtype(ShardConfig(dtype="uint16"), 70_000)
    assert shards_mod.token_dtype(ShardConfig(), 65_536).name == "uint16"
    assert shards_mod.token_dtype(ShardConfig(), 65_537).name == "uint32"  # "auto" widens past 2**16 ids


def test_loader_batches_targets_and_doc_ids(packed):
    out, manifest = packed
    loader = ShardLoader(out, seq_len=64, batch_size=4, seed=0)
    batch = loader.next_batch()
    x, y, d = batch["input_ids"], batch["targets"], batch["doc_ids"]
    assert x.shape == y.shape == d.shape == (4, 64) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    eos = manifest["eos_id"]
    for row_x, row_d in zip(x, d):
        # a new document starts right after every eos, and only there (one id per token passed the old check)
        assert row_d[0] == 0 and torch.equal(row_d.diff(), (row_x[:-1] == eos).long())


def test_loader_deterministic_sharded_and_resumable(packed):
    out, _ = packed
    make = lambda **kw: ShardLoader(out, seq_len=32, batch_size=2, **{"seed": 3, **kw})  # noqa: E731
    a, b = make(), make()
    first = [a.next_batch()["input_ids"] for _ in range(5)]
    assert all(torch.equal(p, q["input_ids"]) for p, q in zip(first, (b.next_batch() for _ in range(5))))
    assert not torch.equal(first[0], make(seed=4).next_batch()["input_ids"])
    # ranks see disjoint windows of the same epoch
    r0, r1 = make(rank=0, world_size=2), make(rank=1, world_size=2)
    assert not set(r0._rank_order().tolist()) & set(r1._rank_order().tolist())
    assert len(r0._rank_order()) == len(r1._rank_order()) == a.num_windows // 2
    # exact resume, including across an epoch boundary
    steps = a.steps_per_epoch + 2
    src = make()
    for _ in range(steps):
        src.next_batch()
    state = json.loads(json.dumps(src.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(3):
        assert torch.equal(src.next_batch()["input_ids"], resumed.next_batch()["input_ids"])
    assert src.epoch == 1
    with pytest.raises(ValueError, match="seq_len"):
        ShardLoader(out, seq_len=16, batch_size=2, seed=3).load_state_dict(state)


def test_loader_resumes_with_another_batch_size_and_world_size(packed):
    """2 ranks x 2 windows for 3 batches have read the permutation's first 12 windows; 1 rank of 4 (or 3
    ranks of 1) resumed from either rank's state reads the next ones, as an uninterrupted 1 x 4 run does."""
    out, _ = packed
    make = lambda **kw: ShardLoader(out, seq_len=32, seed=3, **{"batch_size": 4, **kw})  # noqa: E731
    whole = make()
    reference = [whole.next_batch()["input_ids"] for _ in range(5)]
    ranks = [make(batch_size=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        for _ in range(3):
            r.next_batch()
    states = [json.loads(json.dumps(r.state_dict())) for r in ranks]
    assert states[0] == states[1]
    resumed = make()
    resumed.load_state_dict(states[1])
    assert torch.equal(resumed.next_batch()["input_ids"], reference[3])
    thirds = [make(batch_size=1, rank=r, world_size=3) for r in range(3)]
    for t in thirds:
        t.load_state_dict(states[0])
    got = torch.cat([t.next_batch()["input_ids"] for t in thirds] + [t.next_batch()["input_ids"] for t in thirds])
    assert torch.equal(got[:4], reference[3]) and torch.equal(got[4:], reference[4][:2])
    with pytest.raises(ValueError, match="12 windows read in epoch 0 is not a whole number of batches of 5 x 1"):
        make(batch_size=5).load_state_dict(states[0])


def test_val_split_and_errors(packed, tmp_path):
    out, _ = packed
    val = ShardLoader(out, seq_len=32, batch_size=2, split="val")
    assert all(e["split"] == "val" for e in val.shards) and val.next_batch()["input_ids"].shape == (2, 32)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        ShardLoader(out, seq_len=4096, batch_size=64, split="val")
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardLoader(tmp_path, seq_len=8, batch_size=1)


@pytest.fixture
def one_thread():
    # On a busy 2-core machine torch's intra-op threads contend with other processes; one thread is
    # ~50x faster for this tiny model.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shards_train_a_model(packed, one_thread):
    from pyllm.model import Transformer, preset

    out, manifest = packed
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=manifest["vocab_size"], n_layer=1, d_model=64, max_seq_len=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loader = ShardLoader(out, seq_len=32, batch_size=4, seed=0)
    losses = []
    for _ in range(8):
        batch = loader.next_batch()
        loss = model.loss(batch["input_ids"], batch["targets"], doc_ids=batch["doc_ids"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and np.mean(losses[-2:]) < losses[0] - 0.5


def test_special_token_text_in_documents_is_plain_text(tok_dir, tmp_path):
    # the workers' tokenizer must encode exactly as HFTokenizer.encode: "<|endoftext|>" written in a document is
    # text, never the control id that ends a document
    texts = ["the marker <|endoftext|> inside", "a <|user|> turn and <|end|> of it"]
    pack_shards([(f"d{i}", t) for i, t in enumerate(texts)], tok_dir, tmp_path, ShardConfig(val_fraction=0.0),
                {"test": 1}, workers=1)
    tok = load_tokenizer(tok_dir)
    expected = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    assert np.fromfile(tmp_path / "shard_00000.bin", dtype="<u2").tolist() == expected
