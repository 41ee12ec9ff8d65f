"""A bf16 (or fp16) stage compares like with like: the metrics before training, the DPO reference's log-probs and
the RL rollouts' old and reference log-probs are computed under the run's autocast, as the Trainer computes the
losses and the metrics after training. With a learning rate too small to move an fp32 weight, nothing may change:
before this, an untouched bf16 DPO policy scored 0.44 implicit-reward accuracy after "training" (0 before) and 0.875
at step 1, SFT's completion loss moved by 4e-5, GRPO's first step saw a KL of 6e-8 to itself."""

import pytest

from pyllm.post.dpo import DPOConfig, dpo
from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.sft import SFTConfig, sft

# lr 1e-12: an AdamW step of ~1e-12 is far below the fp32 spacing of these weights (~1e-9), so the model is unchanged
TRAIN = {"model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "progress": False, "device": "cpu", "precision": "bf16",
         "max_steps": 1, "lr": 1e-12, "min_lr": 1e-12, "batch_size": 8, "warmup_steps": 0, "log_every": 1}


@pytest.mark.filterwarnings("ignore:.*emulated")  # bf16 without bf16 CPU units: slow, and a warning says so
def test_an_untrained_bf16_stage_measures_the_same_before_and_after(tmp_path):
    s = dpo(DPOConfig(data="builtin:tasks", out_dir=str(tmp_path / "dpo"), seq_len=48, max_train=32, max_heldout=16,
                      train=TRAIN))
    assert s["after"] == s["before"] and s["before"]["reward_margin"] == 0.0
    step = s["train"]["history"][0]  # the policy is its reference at step 1: every implicit reward is 0
    assert step["reward_margin"] == step["reward_accuracy"] == 0.0 and step["loss"] == pytest.approx(0.6931471805)
    s = sft(SFTConfig(data="builtin:reverse", out_dir=str(tmp_path / "sft"), seq_len=48, max_train=32, max_heldout=16,
                      train=TRAIN))
    assert s["after"] == s["before"]
    g = grpo(GRPOConfig(data="builtin:reverse", out_dir=str(tmp_path / "grpo"), seq_len=48, max_train=32,
                        max_heldout=8, group_size=4, prompts_per_rollout=2, train=TRAIN))
    step = g["train"]["history"][0]  # the rollout's old and reference log-probs are the policy's own
    assert step["kl_ref"] == step["clip_frac"] == step["loss"] == 0.0
