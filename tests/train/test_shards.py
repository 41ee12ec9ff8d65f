"""train(cfg) on the data stage's token shards (pyllm.data.loader.ShardLoader), doc_ids included."""

from pyllm.data.bpe import TokenizerConfig, train_bpe
from pyllm.data.shards import ShardConfig, pack_shards
from pyllm.train import TrainConfig, train
from pyllm.train.data import builtin_text


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
