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
