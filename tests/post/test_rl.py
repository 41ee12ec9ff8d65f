"""RL mechanics on a tiny model: the log-probs the losses use are those of the sampling distribution,
and a killed-and-resumed GRPO / PPO run continues exactly (the rollout buffer is checkpointed)."""

import pytest
import torch

from pyllm.model import Transformer
from pyllm.model.config import ModelConfig
from pyllm.post.chat import ChatTemplate
from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.ppo import PPOConfig, ppo
from pyllm.post.rollout import Rollout, RolloutBatches, rl_setup, sample
from pyllm.post.sequences import generate_responses, response_logprobs
from pyllm.tokenizer import ByteTokenizer

MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32}


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_are_the_sampling_logprobs(temperature):
    # prompts of different lengths: generation left-pads them, the loss forward right-pads
    tok = ByteTokenizer()
    template = ChatTemplate(tok)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, **MODEL)).eval()
    prompts = ["1+2=", "sort 98765", "reverse abcdefghij", "x"]
    _, r_ids, _, gen_logp = generate_responses(model, template, prompts, max_new_tokens=6,
                                               temperature=temperature, seed=3)
    batch, _ = sample(model, template, prompts, max_new_tokens=6, temperature=temperature, seed=3)
    with torch.no_grad():
        logp, mask = response_logprobs(model, batch["input_ids"], batch["train"], temperature)
    for i, expected in enumerate(gen_logp):
        got = logp[i][mask[i] > 0]
        assert len(got) == len(r_ids[i]) == len(expected)
        torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)


def test_rollout_batches_state_round_trips_mid_rollout():
    def make(round_):
        g = torch.Generator().manual_seed(round_)
        return Rollout({"x": torch.randn(6, 3, generator=g), "ids": torch.arange(6) + 10 * round_},
                       {"reward": float(round_)})

    a = RolloutBatches(make, minibatch_size=2, epochs=2, seed=1)
    served = [a.next_batch() for _ in range(4)]  # mid-way through the first rollout (6 batches per rollout)
    b = RolloutBatches(make, minibatch_size=2, epochs=2, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(10):  # the rest of round 0, then round 1
        x, y = a.next_batch(), b.next_batch()
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert len(served) == 4 and a.round == b.round == 3


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_killed_and_resumed_rl_run_continues_exactly(sft_dir, tmp_path, algo):
    def run(out, steps):
        train = {"model": MODEL, "progress": False, "log_every": 1, "max_steps": steps, "batch_size": 4,
                 "ckpt_every": 0}
        # a dense reward (distinct characters of the response), so the tiny policy gets gradients
        common = dict(model=sft_dir, data="builtin:reverse", out_dir=str(out), seq_len=48, max_train=64,
                      max_heldout=4, epochs=2, reward=lambda prompt, response: float(len(set(response))),
                      train=train)
        if algo == "grpo":
            return grpo(GRPOConfig(group_size=2, prompts_per_rollout=4, **common))
        return ppo(PPOConfig(prompts_per_rollout=8, kl_target=0.01, kl_horizon=10, **common))

    full = run(tmp_path / "full", 6)["train"]["history"]
    run(tmp_path / "part", 3)  # 8 samples, minibatch 4, 2 epochs: step 3 is mid-rollout
    resumed = run(tmp_path / "part", 6)["train"]
    assert resumed["resumed_from"] == 3
    keys = ["loss", "reward", "grad_norm"] + (["kl_coef"] if algo == "ppo" else [])
    assert all(h["grad_norm"] > 0 for h in full)  # the policy moves, so a fresh rollout would differ
    assert [[h[k] for k in keys] for h in resumed["history"]] == [[h[k] for k in keys] for h in full[3:]]


def test_skip_train_leaves_out_the_prompts_sft_trained_on(tmp_path):
    def prompts(**kw):
        cfg = GRPOConfig(data="builtin:sort", out_dir=str(tmp_path), max_heldout=4, train={"model": MODEL}, **kw)
        return rl_setup(cfg)[4]

    first, rest = prompts(max_train=30), prompts(skip_train=10, max_train=20)
    assert rest == first[10:30]
    with pytest.raises(ValueError, match="skip_train=100000"):
        prompts(skip_train=100000)
