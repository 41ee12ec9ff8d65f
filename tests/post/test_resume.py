"""A post-training stage that crashes and is started again with the same config loses only the steps since
its last checkpoint and then continues exactly: on CPU the per-step records after the checkpoint, the
final weights and the held-out metrics are those of an uninterrupted run, bit for bit (as
tests/train/test_trainer.py shows for pretraining and tests/post/test_rl.py for RL).

The model has dropout, so a resume that did not restore the random state would drift too."""

import pytest
import torch

from pyllm.model import load_model
from pyllm.post.dpo import DPOConfig, dpo
from pyllm.post.heads import RewardModel
from pyllm.post.reward import RewardConfig, train_reward_model
from pyllm.post.sft import SFTConfig, sft
from pyllm.train.trainer import Trainer

MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32}
STEPS, CKPT_EVERY, CRASH_AFTER = 5, 2, 3  # the crash loses step 3; the run resumes from step 2
UNTIMED = ("tokens_per_s", "mfu", "peak_memory_gb")  # a step record's fields that are not results


class _Crash(Exception):
    """The failure injected into a run."""


@pytest.fixture(scope="module")
def start(tmp_path_factory, model_with_shards):
    """A tiny fresh model with dropout 0.1 saved with a BPE tokenizer, and pretraining shards made with
    that tokenizer (for SFT's replay)."""
    return model_with_shards(tmp_path_factory.mktemp("resume"), 20_000, **MODEL, dropout=0.1)


def common(start, out_dir, train: dict | None) -> dict:
    """Settings every run here shares: a short schedule past its warmup, a checkpoint every CKPT_EVERY steps."""
    return dict(model=start[0], out_dir=str(out_dir), seq_len=48, max_train=64, max_heldout=8,
                train={"progress": False, "log_every": 1, "max_steps": STEPS, "ckpt_every": CKPT_EVERY,
                       "warmup_steps": 2, "batch_size": 4, "lr": 3e-3, **(train or {})})


def run_sft(start, out_dir, train: dict | None = None, **fields) -> dict:
    """SFT on builtin:add with a quarter of every step replayed pretraining text."""
    return sft(SFTConfig(data="builtin:add", max_new_tokens=2, pretrain_mix=0.25, pretrain_data=start[1],
                         **fields, **common(start, out_dir, train)))


def run_rm(start, out_dir, train: dict | None = None, **fields) -> dict:
    return train_reward_model(RewardConfig(data="builtin:tasks", margin=0.5, **fields, **common(start, out_dir, train)))


def run_dpo(start, out_dir, train: dict | None = None, **fields) -> dict:
    return dpo(DPOConfig(data="builtin:tasks", **fields, **common(start, out_dir, train)))


def crashed_and_run_again(run, out_dir, monkeypatch, after_training: bool = False) -> dict:
    """``run(out_dir)`` crashes before its step CRASH_AFTER + 1 (``after_training``: once its Trainer has
    finished, final checkpoint written, model not yet exported), then runs again in the same out_dir;
    returns the second run's summary."""
    step, fit = Trainer.train_step, Trainer.fit

    def crashing_step(self, lr):
        if self.step == CRASH_AFTER:
            raise _Crash
        return step(self, lr)

    def crashing_fit(self):
        fit(self)
        raise _Crash

    with monkeypatch.context() as m:
        m.setattr(Trainer, *(("fit", crashing_fit) if after_training else ("train_step", crashing_step)))
        with pytest.raises(_Crash):
            run(out_dir)
    return run(out_dir)


def results(summary: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in UNTIMED} for r in summary["train"]["history"]]


def final_weights(summary: dict) -> dict[str, torch.Tensor]:
    """The exported model's (a reward model's: with its head)."""
    if summary["stage"] == "rm":
        return RewardModel.load(summary["model_dir"]).state_dict()
    return load_model(summary["model_dir"]).state_dict()


def assert_same_model_and_metrics(whole: dict, again: dict) -> None:
    assert again["after"] == whole["after"]
    want, got = final_weights(whole), final_weights(again)
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def assert_continues_exactly(whole: dict, resumed: dict) -> None:
    """``resumed`` repeats ``whole`` from its checkpoint on: the step records (loss, grad norm, the stage's
    metrics), the held-out metrics after training and the final weights, exactly."""
    assert resumed["train"]["resumed_from"] == CKPT_EVERY
    assert [r["step"] for r in resumed["train"]["history"]] == list(range(CKPT_EVERY + 1, STEPS + 1))
    assert all(r["grad_norm"] > 0 for r in whole["train"]["history"])  # the model moves at every step
    assert results(resumed) == results(whole)[CKPT_EVERY:]
    assert_same_model_and_metrics(whole, resumed)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_crashed_sft_with_replay_continues_exactly(start, tmp_path, monkeypatch, lora_rank):
    def run(out_dir):
        return run_sft(start, out_dir, {"lr": 1e-2}, lora_rank=lora_rank)

    whole = run(tmp_path / "whole")
    assert whole["replay_rows"] == 1 and {"sft_loss", "replay_loss"} <= set(whole["train"]["history"][0])
    assert {"completion_loss", "exact_match", "text_loss"} <= set(whole["after"])
    assert_continues_exactly(whole, crashed_and_run_again(run, tmp_path / "crashed", monkeypatch))


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_crashed_reward_model_continues_exactly(start, tmp_path, monkeypatch, lora_rank):
    def run(out_dir):  # the head is random (seeded), LoRA's adapters too
        return run_rm(start, out_dir, lora_rank=lora_rank)

    whole = run(tmp_path / "whole")
    assert {"pairwise_accuracy", "margin"} <= set(whole["after"])
    assert_continues_exactly(whole, crashed_and_run_again(run, tmp_path / "crashed", monkeypatch))


@pytest.mark.parametrize("precompute_ref,length_normalize,lora_rank", [(True, False, 0), (True, True, 0),
                                                                        (False, False, 2)])
def test_crashed_dpo_continues_exactly(start, tmp_path, monkeypatch, precompute_ref, length_normalize, lora_rank):
    def run(out_dir):
        return run_dpo(start, out_dir, precompute_ref=precompute_ref, length_normalize=length_normalize,
                       lora_rank=lora_rank)

    whole = run(tmp_path / "whole")
    assert {"reward_accuracy", "reward_margin", "logp_accuracy"} <= set(whole["after"])
    assert_continues_exactly(whole, crashed_and_run_again(run, tmp_path / "crashed", monkeypatch))


@pytest.mark.parametrize("run_stage", [run_sft, run_rm, run_dpo])
def test_a_stage_crashed_after_training_reports_what_an_uninterrupted_run_does(start, tmp_path, monkeypatch,
                                                                               run_stage):
    """Run again, it resumes at its last step and trains nothing. Its held-out metrics were measured
    outside the run's autocast: in bf16 they differed from those of the run that did not crash."""
    def run(out_dir):
        return run_stage(start, out_dir, {"precision": "bf16"})

    whole = run(tmp_path / "whole")
    again = crashed_and_run_again(run, tmp_path / "crashed", monkeypatch, after_training=True)
    assert again["train"]["resumed_from"] == STEPS and again["train"]["history"] == []
    assert_same_model_and_metrics(whole, again)
