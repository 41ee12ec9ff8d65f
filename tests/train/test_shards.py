"""train(cfg) on the data stage's token shards (pyllm.data.loader.ShardLoader), doc_ids included."""

import json

import pytest
import torch

from pyllm.data.bpe import TokenizerConfig, train_bpe
from pyllm.data.shards import ShardConfig, pack_shards
from pyllm.model import Transformer
from pyllm.train import TrainConfig, train
from pyllm.train.data import builtin_text
from pyllm.train.run import build_data


def test_train_on_shards(tmp_path):
    docs = [(f"topic-{i}", t) for i, t in enumerate(builtin_text()[:150_000].split("\n\n")) if t.strip()]
    train_bpe((t for _, t in docs), TokenizerConfig(vocab_size=300), tmp_path / "tok")
    pack_shards(iter(docs), tmp_path / "tok", tmp_path / "shards", ShardConfig(shard_tokens=20_000, val_fraction=0.1),
                {"test": 1}, workers=1)
    cfg = TrainConfig(data=str(tmp_path / "shards"), seq_len=32, batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4,
                      warmup_steps=3, eval_every=15, eval_batches=2, log_every=5, progress=False,
                      out_dir=str(tmp_path / "run"), device="cpu", model={"n_layer": 1, "n_head": 2, "d_model": 32})
    summary = train(cfg)
    history = [r["loss"] for r in summary["history"]]
    assert history[-1] < history[0] - 0.5 and summary["eval"]["val_loss"] < 5.0
    assert summary["history"][-1]["step"] == 30


def _stream_shards(directory, train_windows=30, val_windows=7, seq_len=16, doc_tokens=None):
    """A shard directory written by hand: ``train_windows`` and ``val_windows`` windows of the built-in
    text's bytes, one document each (or documents of ``doc_tokens`` tokens), with the byte tokenizer."""
    import numpy as np

    from pyllm.data.shards import FORMAT
    from pyllm.tokenizer import ByteTokenizer

    directory.mkdir()
    text, entries = np.frombuffer(builtin_text()[:10_000].encode(), dtype=np.uint8), []
    for split, windows in (("train", train_windows), ("val", val_windows)):
        tokens = windows * seq_len + 1
        text[:tokens].astype("<u2").tofile(directory / f"{split}.bin")
        text = text[tokens:]
        np.arange(0, tokens, doc_tokens or tokens, dtype="<u8").tofile(directory / f"{split}.idx")
        entries.append({"file": f"{split}.bin", "index_file": f"{split}.idx", "split": split, "tokens": tokens})
    ByteTokenizer().save(directory)
    (directory / "manifest.json").write_text(json.dumps({"format": FORMAT, "dtype": "uint16", "vocab_size": 256,
                                                         "eos_id": 0, "shards": entries}))
    return str(directory)


def _tiny(data, out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{"data": data, "seq_len": 16, "batch_size": 4, "max_steps": 10, "lr": 3e-3, "warmup_steps": 2,
                          "eval_every": 5, "eval_batches": 2, "log_every": 1, "progress": False,
                          "out_dir": str(out_dir), "device": "cpu", "distributed": "none",
                          "model": {"n_layer": 1, "n_head": 2, "d_model": 32}, **overrides})


def test_training_past_an_epoch_does_not_depend_on_the_micro_batch_size(tmp_path):
    """30 windows, 4 per step: micro-batches of 4 and of 1 train on the same windows after the first epoch
    (it ended after 28 windows with micro-batches of 4, after 30 with 1, so the losses parted at step 8),
    and validate on the same 8 windows of the 7 in the val split (it wrapped after 4 or 7)."""
    data = _stream_shards(tmp_path / "shards")
    history = []
    for micro in (4, 1):
        train(_tiny(data, tmp_path / str(micro), micro_batch_size=micro))
        records = map(json.loads, (tmp_path / str(micro) / "metrics.jsonl").read_text().splitlines())
        history.append([(r["step"], k, r[k]) for r in records for k in ("loss", "val_loss") if k in r])
    assert [h[:2] for h in history[0]] == [h[:2] for h in history[1]] and len(history[0]) == 12  # 10 + 2 evals
    for (step, key, value), (_, _, value1) in zip(*history):
        assert value1 == pytest.approx(value, rel=1e-5), (step, key)


def test_the_validation_set_does_not_depend_on_the_layout(tmp_path):
    """build_data's validation batches hold the same windows (the first 12 of the val stream) for any
    micro-batch size and on every rank of any number of processes."""
    data = _stream_shards(tmp_path / "shards")
    expected = None
    for micro, world_size in ((3, 1), (1, 1), (6, 1), (3, 2), (1, 3)):
        cfg = _tiny(data, tmp_path, batch_size=6, micro_batch_size=micro)
        for rank in range(world_size):
            val = torch.cat([b["input_ids"] for b in build_data(cfg, rank, world_size)[2]])
            expected = val if expected is None else expected
            assert torch.equal(val, expected), (micro, world_size, rank)


def test_training_and_validation_see_the_loaders_doc_ids(tmp_path, monkeypatch):
    """Every loss train() computes, training steps and validation alike, gets the doc_ids of the loader's
    batch (documents of 11 tokens, so a window of 16 holds two or three and attention must stop at them)."""
    data = _stream_shards(tmp_path / "shards", doc_tokens=11)
    cfg = _tiny(data, tmp_path / "run", max_steps=4, eval_every=2)
    _, train_src, val_batches = build_data(cfg, 0, 1)
    steps = [train_src.next_batch() for _ in range(cfg.max_steps)]
    assert all((b["doc_ids"].amax(1) >= 1).all() for b in steps + val_batches)  # every window crosses a boundary
    seen = {True: [], False: []}  # training mode -> (input_ids, doc_ids) of each loss computed
    loss = Transformer.loss

    def spy(model, idx, targets, **kwargs):
        seen[model.training].append((idx.clone(), kwargs.get("doc_ids")))
        return loss(model, idx, targets, **kwargs)

    monkeypatch.setattr(Transformer, "loss", spy)
    train(cfg)
    evaluations = len(seen[False]) // len(val_batches)
    assert len(seen[True]) == len(steps) and evaluations >= 2 and len(seen[False]) == evaluations * len(val_batches)
    for call, ((idx, doc_ids), batch) in enumerate(zip(seen[True] + seen[False], steps + val_batches * evaluations)):
        assert torch.equal(idx, batch["input_ids"]), call
        assert doc_ids is not None and torch.equal(doc_ids, batch["doc_ids"]), call
