"""Post-training tests run tiny models: one intra-op thread is faster than two on a shared 2-core
machine (no oversubscription); restored after each test so other test files are unaffected."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A tiny SFT model (1 layer, width 32) on the reverse task, shared by the stage and RL tests."""
    from pyllm.post.sft import SFTConfig, sft

    out = tmp_path_factory.mktemp("sft")
    summary = sft(SFTConfig(data="builtin:reverse", out_dir=str(out), max_train=800, max_heldout=32, seq_len=48,
                            train={"model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "progress": False,
                                   "log_every": 1, "max_steps": 40, "lr": 1e-2, "batch_size": 8, "seq_len": 48}))
    # the held-out completion loss falls (trained on assistant tokens only)
    assert summary["after"]["completion_loss"] < summary["before"]["completion_loss"] - 1.0
    assert summary["train"]["steps"] == 40
    assert (out / "post_summary.json").exists()
    return summary["model_dir"]


@pytest.fixture(scope="session")
def model_with_shards():
    """``model_with_shards(tmp, text_chars, **model)``, below (tests/post is no package to import it from)."""
    return _model_with_shards


def _model_with_shards(tmp, text_chars: int, **model) -> tuple[str, str]:
    """A tiny fresh model (``model``: ModelConfig fields) saved with a BPE tokenizer (300 ids) trained on the first
    ``text_chars`` characters of the built-in text, and pretraining shards of that text made with it (SFT's
    replay): (model dir, shard dir)."""
    from pyllm.data.bpe import TokenizerConfig, train_bpe
    from pyllm.data.shards import ShardConfig, pack_shards
    from pyllm.model import Transformer, preset, save_model
    from pyllm.tokenizer import load_tokenizer
    from pyllm.train.data import builtin_text

    docs = [(f"topic-{i}", t) for i, t in enumerate(builtin_text()[:text_chars].split("\n\n")) if t.strip()]
    train_bpe((t for _, t in docs), TokenizerConfig(vocab_size=300), tmp / "tok")
    pack_shards(iter(docs), tmp / "tok", tmp / "shards", ShardConfig(val_fraction=0.1), {"test": 1}, workers=1)
    tokenizer = load_tokenizer(tmp / "shards")
    torch.manual_seed(0)
    save_model(Transformer(preset("tiny", **model, vocab_size=tokenizer.vocab_size, max_seq_len=48)), tmp / "model",
               tokenizer)
    return str(tmp / "model"), str(tmp / "shards")
