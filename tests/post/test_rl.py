"""RL mechanics on a tiny model: the log-probs the losses use are those of the sampling distribution,
and a killed-and-resumed GRPO / PPO run continues exactly (the rollout buffer is checkpointed, as
tensors in state.safetensors)."""

import json

import pytest
import torch

from pyllm.model import Transformer
from pyllm.model.config import ModelConfig
from pyllm.post.chat import ChatTemplate
from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.ppo import PPOConfig, ppo
from pyllm.post.packing import Encoded
from pyllm.post.rollout import (Rollout, RolloutBatches, heldout_metrics, make_reward_fn, rl_setup, sample,
                                 sampled_kl)
from pyllm.post.sequences import collate, generate_responses, response_logprobs
from pyllm.tokenizer import ByteTokenizer
from pyllm.train import CheckpointError, TrainConfig, Trainer
from pyllm.train.checkpoint import step_dir_name

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


def _policy_and_reference():
    """A byte tokenizer, its chat template and two differently initialised tiny models."""
    tok = ByteTokenizer()
    torch.manual_seed(0)
    models = [Transformer(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, **MODEL)).eval() for _ in range(2)]
    return tok, ChatTemplate(tok), *models


def test_sampled_kl_is_the_mean_over_responses_of_their_log_ratio():
    # KL(policy || reference) per response (what RL's held-out KL and the pipeline's eval table report):
    # the policy's sampling log-probs minus the reference's, each response scored alone (no padding), summed
    # per response and averaged; against itself the policy gives exactly 0
    tok, template, policy, reference = _policy_and_reference()
    prompts = ["1+2=", "sort 98765", "reverse abcdefghij", "x"]
    p_ids, r_ids, _, gen_logp = generate_responses(policy, template, prompts, max_new_tokens=6, temperature=1.0,
                                                   seed=5)
    batch, _ = sample(policy, template, prompts, max_new_tokens=6, temperature=1.0, seed=5)
    per_response = []
    for p, r, lp in zip(p_ids, r_ids, gen_logp):
        one = collate([Encoded(tuple(p + r), (False,) * len(p) + (True,) * len(r))], tok.pad_id, "cpu")
        with torch.no_grad():
            ref_logp, mask = response_logprobs(reference, one["tokens"], one["train"])
        per_response.append(sum(lp) - (ref_logp * mask).sum().item())
    assert len({round(k, 3) for k in per_response}) > 1
    assert sampled_kl(policy, reference, batch) == pytest.approx(sum(per_response) / len(prompts), abs=1e-4)
    assert sampled_kl(policy, policy, batch) == 0.0


def test_heldout_sampled_reward_and_kl_average_over_the_samples_per_prompt():
    # heldout_metrics(samples=k): the sampled reward and KL are the means of k one-sample measurements with
    # seeds seed .. seed + k - 1 (greedy accuracy does not sample)
    tok, template, policy, reference = _policy_and_reference()
    examples = rl_setup(GRPOConfig(data="builtin:add", max_heldout=12, train={"model": MODEL}))[5]
    # a reward in (0, 1) per response (the checker would give 0 to every answer of an untrained model)
    reward = make_reward_fn(lambda p, r: (len(r) % 5) / 4, template, 64, "cpu")
    ones = [heldout_metrics(policy, reference, template, examples, reward, 6, seed=s) for s in (7, 8, 9)]
    three = heldout_metrics(policy, reference, template, examples, reward, 6, seed=7, samples=3)
    assert len({m["sampled_reward"] for m in ones}) > 1  # the seeds give different samples
    for key in ("sampled_reward", "kl_to_ref"):
        assert three[key] == pytest.approx(sum(m[key] for m in ones) / 3, rel=1e-6)
    assert three["accuracy"] == ones[0]["accuracy"] and three["mean_reward"] == ones[0]["mean_reward"]


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


def test_rollout_batches_resume_with_another_minibatch_size_continues_at_the_same_sample():
    """served counts minibatches: a resume with another micro-batch went on from the wrong sample."""
    def make(round_):
        return Rollout({"ids": torch.arange(12) + 100 * round_}, {"reward": float(round_)})

    a = RolloutBatches(make, minibatch_size=4, epochs=2, seed=1)
    [a.next_batch() for _ in range(3)]  # 12 samples in: the second pass over round 0 begins
    b = RolloutBatches(make, minibatch_size=2, epochs=2, seed=1)
    b.load_state_dict(a.state_dict())
    rest_a = torch.cat([a.next_batch()["ids"] for _ in range(5)])  # the rest of round 0, then round 1
    rest_b = torch.cat([b.next_batch()["ids"] for _ in range(10)])
    assert torch.equal(rest_a, rest_b)
    c = RolloutBatches(make, minibatch_size=8, epochs=2, seed=1)
    with pytest.raises(CheckpointError, match="12 samples into its rollout, not a whole number of minibatches of 8"):
        c.load_state_dict(a.state_dict() | {"served": 3, "minibatch_size": 4})


def _lm_rollout(round_):
    """A rollout of 8 language-model rows (what lm_loss trains on) plus a per-token float buffer."""
    g = torch.Generator().manual_seed(round_)
    ids = torch.randint(0, 256, (8, 17), generator=g)
    return Rollout({"input_ids": ids[:, :-1], "targets": ids[:, 1:], "old_logp": torch.randn(8, 16, generator=g),
                    "train": torch.rand(8, 16, generator=g) > 0.5}, {"reward": float(round_)})


def _rl_trainer(out_dir, max_steps):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=256, max_seq_len=16, **MODEL))
    cfg = TrainConfig(seq_len=16, batch_size=4, max_steps=max_steps, ckpt_every=2, keep_last=3, log_every=1,
                      progress=False, out_dir=str(out_dir), distributed="none", device="cpu")
    return Trainer(model, cfg, RolloutBatches(_lm_rollout, minibatch_size=4, epochs=2, seed=0))


def test_rollout_buffer_is_in_state_safetensors_and_its_corruption_is_caught(tmp_path):
    """4 minibatches per rollout: at step 6 the buffer is round 1's, 2 minibatches served. The manifest
    only refers to its tensors; a flipped byte inside one of them fails the checksum, and the trainer
    falls back to step 4, whose buffer is round 0's, bit for bit."""
    _rl_trainer(tmp_path, 6).fit()
    newest = tmp_path / "checkpoints" / step_dir_name(6)
    data = json.loads((newest / "manifest.json").read_text())["meta"]["data"][0]
    names = {k: f"data.0.rollout.tensors.{k}" for k in _lm_rollout(1).tensors}
    assert data["rollout"]["tensors"] == {k: {"__tensor__": name} for k, name in names.items()}
    assert (data["round"], data["served"]) == (2, 2)
    state = checkpoint_tensors(newest / "state.safetensors")
    for k, v in _lm_rollout(1).tensors.items():
        assert state[names[k]].dtype == v.dtype and torch.equal(state[names[k]], v), k

    start, end = tensor_byte_range(newest / "state.safetensors", names["old_logp"])
    raw = bytearray((newest / "state.safetensors").read_bytes())
    raw[(start + end) // 2] ^= 0x01
    (newest / "state.safetensors").write_bytes(bytes(raw))
    resumed = _rl_trainer(tmp_path, 6)
    with pytest.warns(RuntimeWarning, match=rf"{newest.name} is corrupted \(state.safetensors checksum mismatch\); "
                                            rf"falling back to {step_dir_name(4)}"):
        assert resumed.resume()
    batches = resumed.batches
    assert (resumed.step, batches.round, batches.served, batches.last_stats) == (4, 1, 4, {"reward": 0.0})
    assert all(torch.equal(batches.rollout.tensors[k], v) for k, v in _lm_rollout(0).tensors.items())


def checkpoint_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def tensor_byte_range(path, name) -> tuple[int, int]:
    """[start, end) of one tensor's data in a safetensors file (8-byte header length, JSON header, data)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def test_rollout_buffer_saved_as_json_lists_is_refused_in_one_line():
    old = {"round": 1, "seed": 0, "served": 1, "stateful": {},
           "rollout": {"stats": {}, "tensors": {"x": {"dtype": "float32", "data": [1.0, 2.0]}}}}
    with pytest.raises(CheckpointError, match="rollout buffer as JSON lists"):
        RolloutBatches(_lm_rollout, minibatch_size=4, epochs=1).load_state_dict(old)


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


def _tiny_rl(algo, tmp_path, reward, **kw):
    """A fresh tiny policy (no SFT) on builtin:reverse: 2 held-out prompts, 1 sample each."""
    train = {"model": MODEL, "progress": False, "log_every": 1, "max_steps": 2, "batch_size": 4, "ckpt_every": 0}
    common = dict(data="builtin:reverse", out_dir=str(tmp_path), seq_len=48, max_train=kw.pop("max_train", 64),
                  max_heldout=2, heldout_samples=1, epochs=1, reward=reward, train=train)
    if algo == "grpo":
        return grpo(GRPOConfig(group_size=2, prompts_per_rollout=4, **common, **kw))
    return ppo(PPOConfig(prompts_per_rollout=8, **common, **kw))


@pytest.mark.parametrize("algo,bad", [("grpo", "nan"), ("ppo", "inf")])
def test_non_finite_reward_in_a_rollout_is_an_error_naming_prompt_and_response(tmp_path, algo, bad):
    # the 4 held-out calls (2 greedy, 2 sampled) pass; one response of the first rollout gets nan / inf,
    # which used to make every weight nan and the run die later inside sampling
    calls = [0]

    def reward(prompt, response):
        calls[0] += 1
        return float(bad) if calls[0] == 6 else 1.0

    with pytest.raises(ValueError, match=rf"^reward '.*reward' on prompt 'reverse \w+', response .* returned {bad}; "
                                         "rewards must be finite") as e:
        _tiny_rl(algo, tmp_path, reward)
    assert "\n" not in str(e.value) and calls[0] == 6


@pytest.mark.parametrize("returns,match", [(None, "returned None, not a number"),
                                           ([1.0], r"returned \[1.0\], not a number"),
                                           (KeyError("x"), "failed: KeyError: 'x'")])
def test_reward_function_failure_names_the_function_and_prompt(returns, match):
    def score(prompt, response):
        if isinstance(returns, Exception):
            raise returns
        return returns

    reward = make_reward_fn(score, ChatTemplate(ByteTokenizer()), 48, "cpu")
    with pytest.raises(ValueError, match=rf"^reward '.*score' on prompt 'reverse abc', response 'cb' {match}"):
        reward(["reverse abc"], ["cb"])
    assert make_reward_fn(lambda p, r: 2, ChatTemplate(ByteTokenizer()), 48, "cpu")(["p"], ["r"]) == [2.0]


@pytest.mark.parametrize("algo,max_train,samples", [("grpo", 1, 2), ("grpo", 3, 6), ("ppo", 6, 6)])
def test_fewer_prompts_than_a_rollout_is_checked_on_the_real_rollout_size(tmp_path, algo, max_train, samples):
    # a rollout samples min(prompts_per_rollout, training prompts): one smaller than the minibatch (4) used
    # to fail with IndexError, one not a multiple of it silently never trained on the remainder
    with pytest.raises(ValueError, match=rf"a rollout of {samples} samples per process \(only {max_train} training "
                                         r"prompts, fewer than the \d per rollout\) is not a multiple of the "
                                         r"minibatch \(4\)"):
        _tiny_rl(algo, tmp_path, lambda p, r: 1.0, max_train=max_train)


def test_fewer_prompts_than_a_rollout_train_on_every_sample(tmp_path):
    # 2 prompts x group_size 2 = 4 samples: one minibatch per rollout, so each step is one fresh rollout
    summary = _tiny_rl("grpo", tmp_path, lambda p, r: float(len(set(r))), max_train=2)
    assert summary["train"]["steps"] == summary["rollouts"] == 2


def test_exact_match_strips_the_reference_as_well_as_the_answer(monkeypatch):
    # a JSONL reference " yes" could never match: only the model's answer was stripped
    from pyllm.post import rollout
    from pyllm.post.datasets import Example, exact_match

    assert exact_match(" yes", " yes") and exact_match("yes\n", " yes ") and not exact_match("no", " yes")
    # RL's held-out greedy accuracy compares the same way: every answer here is " yes"
    tok, template, policy, reference = _policy_and_reference()
    real = rollout.sample
    monkeypatch.setattr(rollout, "sample", lambda *a, **k: (real(*a, **k)[0], [" yes"] * len(a[2])))
    examples = [Example("q1", " yes"), Example("q2", "yes\n"), Example("q3", "no")]
    metrics = heldout_metrics(policy, reference, template, examples, lambda p, r: [0.0] * len(p), 4)
    assert metrics["accuracy"] == pytest.approx(2 / 3)


def test_rollout_size_check_under_torchrun_names_the_per_process_numbers(monkeypatch):
    """Under torchrun the config's own check used one process's numbers: 6 samples vs a minibatch of 4."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"a rollout of 3 samples per process is not a multiple of the minibatch \(2\)"):
        PPOConfig(prompts_per_rollout=6, train={"batch_size": 4})
