"""Post-training stages under data parallelism: two CPU processes (gloo, DDP) with the global batch split
between them reproduce one process (SFT, reward model, DPO); RL ranks sample their own rollouts and keep
equal weights; each process evaluates its share of the held-out items and all report the metrics of one
process evaluating them all (every stage, RL's sampled responses included); and SFT's loss is the mean
over every trained token of a step however the step is split into micro-batches (the counts differ
between packed rows)."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyllm.model import Transformer, load_model
from pyllm.model.config import ModelConfig
from pyllm.tokenizer import ByteTokenizer
from pyllm.post.chat import ChatTemplate
from pyllm.post.datasets import Example, task_examples
from pyllm.post.dpo import DPOConfig, dpo
from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.heads import RewardModel
from pyllm.post.packing import IGNORE, PackedBatches, encode_examples, pack
from pyllm.post.ppo import PPOConfig, ppo
from pyllm.post.reward import RewardConfig, train_reward_model
from pyllm.post.rollout import heldout_metrics, make_reward_fn
from pyllm.post.sft import SFTConfig, sft
from pyllm.train import Trainer
from pyllm.train.distributed import DistInfo


def _train(**overrides):
    return {"model": {"n_layer": 1, "n_head": 2, "d_model": 32}, "progress": False, "log_every": 1,
            "max_steps": 3, "batch_size": 4, "lr": 3e-3, "device": "cpu", **overrides}


def _stages(out: str, train: dict):
    """name -> a call of that stage writing under ``out`` (SFT first: the later stages start from it)."""
    sft_dir = os.path.join(out, "sft", "final")
    common = dict(seq_len=48, max_heldout=8, train=train)
    return {
        "sft": lambda: sft(SFTConfig(data="builtin:reverse", out_dir=os.path.join(out, "sft"), max_train=64, **common)),
        "rm": lambda: train_reward_model(RewardConfig(model=sft_dir, data="builtin:tasks", max_train=64,
                                                      out_dir=os.path.join(out, "rm"), **common)),
        "dpo": lambda: dpo(DPOConfig(model=sft_dir, data="builtin:tasks", max_train=64,
                                     out_dir=os.path.join(out, "dpo"), **common)),
    }


def _losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["train"]["history"]]


def _weights(model_dir: str) -> dict[str, np.ndarray]:
    """A model's (a reward model's: its body's and head's) weights."""
    model = RewardModel.load(model_dir) if os.path.exists(os.path.join(model_dir, "reward_head.safetensors")) \
        else load_model(model_dir)
    return {k: v.numpy() for k, v in model.state_dict().items()}


# Weights agree to a tenth of one Adam step (lr 3e-3): parameters whose gradient is zero up to rounding
# (the key part of the qkv bias: softmax ignores a constant added to all of a query's scores; the reward
# model's final-norm bias behind its zero-initialised head) take Adam steps of up to lr in the direction of
# that rounding, which differs between 1 x 4 and 2 x 2 rows.
WEIGHT_ATOL = 3e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {name: run() for name, run in _stages(out, _train()).items()}
        results = {name: {"losses": _losses(s), "tokens": s["train"]["tokens"], "before": s["before"],
                          "after": s["after"]} for name, s in results.items()}
        rl = {}
        start = os.path.join(out, "sft", "final")
        common = dict(model=start, data="builtin:reverse", seq_len=48, max_train=64, max_heldout=4, epochs=1)
        for name, run in (("grpo", lambda: grpo(GRPOConfig(out_dir=os.path.join(out, "grpo"), group_size=2,
                                                             prompts_per_rollout=4, train=_train(), **common))),
                          ("ppo", lambda: ppo(PPOConfig(out_dir=os.path.join(out, "ppo"), prompts_per_rollout=4,
                                                        train=_train(batch_size=2), **common)))):
            summary = run()
            rl[name] = {"rollouts": summary["rollouts"], "steps": summary["train"]["steps"],
                        "losses": _losses(summary), "after": summary["after"]}
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": results, "rl": rl}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    """Global batch 4 (2 per process) vs one process of 4: the same losses step by step and the same final
    weights, up to fp32 summation order, for SFT (packed rows of different trained-token counts), the reward
    model and DPO; only process 0 writes files."""
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    torch.set_num_threads(1)
    one = {name: run() for name, run in _stages(str(tmp_path / "one"), _train()).items()}
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert two[0]["losses"] == two[1]["losses"]  # every rank logs the mean over ranks (and the same metrics)
    # the fresh SFT model is the same in both layouts, so are its held-out metrics (the rest start from the
    # SFT models, which differ by training rounding: test_heldout_metrics_... compares them on equal models)
    _assert_same_metrics(two[0]["losses"]["sft"]["before"], one["sft"]["before"], "sft")
    for name, summary in one.items():
        np.testing.assert_allclose(two[0]["losses"][name]["losses"], _losses(summary), rtol=1e-5, err_msg=name)
        assert len(_losses(summary)) == 3
        # each process trained on its half of the batch, not on a copy of the whole one: the same number of
        # tokens (packed rows), or no more (pairs: each half is padded to its own longest row)
        tokens, want = two[0]["losses"][name]["tokens"], summary["train"]["tokens"]
        assert tokens == want if name == "sft" else want / 2 < tokens <= want, name
    for name in ("sft", "rm", "dpo"):
        got, want = _weights(str(tmp_path / "two" / name / "final")), _weights(one[name]["model_dir"])
        for k in want:
            np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=WEIGHT_ATOL, err_msg=f"{name} {k}")
    # RL: each process samples half of each rollout's prompts (2 steps per rollout, as in one process);
    # the logged losses are the mean over ranks, and the held-out metrics (each rank evaluated its share,
    # then the results were all-reduced) agree
    for name in ("grpo", "ppo"):
        assert two[0]["rl"][name] == two[1]["rl"][name], name
        assert (two[0]["rl"][name]["rollouts"], two[0]["rl"][name]["steps"]) == (2, 3), name
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["dpo", "grpo", "ppo", "rank0.json",
                                                                    "rank1.json", "rm", "sft"]


def test_rank_batches_split_the_one_process_batch_and_resume_on_any_layout():
    rows = pack(encode_examples(ChatTemplate(ByteTokenizer()), [Example("ab" * (i % 5 + 1), "c" * (i % 7 + 1))
                                                                 for i in range(40)], 48), 48, 0)
    one = PackedBatches(rows, 4, seed=3)
    ranks = [PackedBatches(rows, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(25):  # across epochs
        want = one.next_batch()
        got = [r.next_batch() for r in ranks]
        for k in want:
            assert torch.equal(torch.cat([g[k] for g in got]) if k != "loss_weight" else
                               torch.tensor(sum(g[k] for g in got)), torch.as_tensor(want[k])), k
        assert want["loss_weight"] == int((want["targets"] != IGNORE).sum())
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    three = PackedBatches(rows, 1, seed=3, rank=1, world_size=4)  # resumed as 4 processes of 1 row
    three.load_state_dict(ranks[1].state_dict())
    assert torch.equal(three.next_batch()["input_ids"][0], one.next_batch()["input_ids"][1])


def test_sft_loss_is_the_mean_over_the_steps_trained_tokens_however_the_step_is_split(tmp_path):
    """Packed rows hold different numbers of trained tokens: 4 micro-batches of 1 row must step like 1 of 4
    (the mean over all the step's trained tokens, not the mean of 4 per-row means)."""
    runs = [sft(SFTConfig(data="builtin:reverse", out_dir=str(tmp_path / str(micro)), max_train=64, max_heldout=4,
                          seq_len=48, train=_train(micro_batch_size=micro)))
            for micro in (4, 1)]
    counts = [len(r["train"]["history"]) for r in runs]
    assert counts == [3, 3]
    np.testing.assert_allclose(_losses(runs[1]), _losses(runs[0]), rtol=1e-5)
    got, want = _weights(runs[1]["model_dir"]), _weights(runs[0]["model_dir"])
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=WEIGHT_ATOL, err_msg=k)


def _assert_same_metrics(got: dict, want: dict, name: str) -> None:
    """Held-out metrics of two layouts: accuracies and rates (counts over the same items) exactly, means of
    float values to float rounding (an item's forward pass sits in another batch; a reward margin is the
    difference of two fp32 scores of order 1, hence the absolute floor)."""
    assert got.keys() == want.keys(), name
    for k in want:
        if "accuracy" in k or k == "exact_match":
            assert got[k] == want[k], (name, k, got[k], want[k])
        else:
            assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-6), (name, k, got[k], want[k])


class _EvalRows:
    """Rows of the sequences the model reads whole (prompt prefills and scoring passes, not one-token decode
    steps) inside the Trainer's evaluations: the held-out items a process evaluated, times a per-stage factor."""

    def __init__(self, setattr_):
        self.count, self.active = 0, False
        hidden, evaluate = Transformer.hidden, Trainer.evaluate

        def counting_hidden(model, idx, *args, **kwargs):
            if self.active and idx.shape[1] > 1:
                self.count += idx.shape[0]
            return hidden(model, idx, *args, **kwargs)

        def counting_evaluate(trainer):
            self.active = True
            try:
                return evaluate(trainer)
            finally:
                self.active = False

        setattr_(Transformer, "hidden", counting_hidden)
        setattr_(Trainer, "evaluate", counting_evaluate)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


N_HELDOUT = 9  # shares of 5 and 4 items


def _length_reward(prompt: str, response: str) -> float:
    """A reward in (0, 1) that an untrained model's responses already spread over."""
    return (len(response) % 5) / 4


def _heldout_stages(out: str, start: str):
    """Every stage from ``start``, trained one step that moves no weight (lr 1e-30): both layouts measure
    the same model before and after."""
    train = _train(max_steps=1, lr=1e-30, min_lr=0.0)
    common = dict(model=start, seq_len=48, max_train=64, max_heldout=N_HELDOUT, train=train)
    rl = dict(common, data="builtin:reverse", epochs=1, prompts_per_rollout=4, heldout_samples=2,
              reward=_length_reward)
    return {
        "sft": lambda: sft(SFTConfig(data="builtin:reverse", out_dir=os.path.join(out, "sft"), **common)),
        "rm": lambda: train_reward_model(RewardConfig(data="builtin:tasks", out_dir=os.path.join(out, "rm"), **common)),
        "dpo": lambda: dpo(DPOConfig(data="builtin:tasks", out_dir=os.path.join(out, "dpo"), **common)),
        "grpo": lambda: grpo(GRPOConfig(out_dir=os.path.join(out, "grpo"), group_size=2, **rl)),
        "ppo": lambda: ppo(PPOConfig(out_dir=os.path.join(out, "ppo"), **dict(rl, train={**train, "batch_size": 2}))),
    }


def _direct_heldout_metrics(info: DistInfo | None) -> dict:
    """RL's held-out metrics of a policy against another model as reference (a KL that is not 0)."""
    tok = ByteTokenizer()
    torch.manual_seed(0)
    policy, reference = [Transformer(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=64, n_layer=1, n_head=2,
                                                 d_model=32)).eval() for _ in range(2)]
    return heldout_metrics(policy, reference, ChatTemplate(tok), task_examples(n=11), make_reward_fn(
        _length_reward, ChatTemplate(tok), 64, "cpu"), 6, seed=3, samples=2, info=info)


def _heldout_worker(rank: int, world_size: int, port: int, out: str, start: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = _EvalRows(setattr)
        results = {}
        for name, run in _heldout_stages(out, start).items():
            summary = run()
            results[name] = {"before": summary["before"], "after": summary["after"], "rows": rows.take()}
        results["direct"] = _direct_heldout_metrics(DistInfo(rank, world_size))
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_heldout_metrics_are_shared_out_and_equal_one_process(tmp_path, sft_dir, monkeypatch):
    """Each of 2 processes evaluates its share of the held-out items (5 and 4 of 9: the rows its model read
    in the Trainer's evaluation are that share of one process's), and both report the metrics of one process
    evaluating all of them: counts and accuracies exactly, means to float rounding, RL's sampled responses
    (rewards, KL to a different reference) included."""
    mp.spawn(_heldout_worker, args=(2, _free_port(), str(tmp_path / "two"), sft_dir), nprocs=2, join=True)
    two = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    metrics = [{name: {k: v for k, v in r.items() if k != "rows"} for name, r in t.items()} for t in two]
    assert metrics[0] == metrics[1]  # every process ends with the same metrics
    rows = _EvalRows(monkeypatch.setattr)
    for name, run in _heldout_stages(str(tmp_path / "one"), sft_dir).items():
        summary = run()
        one_rows = rows.take()
        for when in ("before", "after"):
            _assert_same_metrics(two[0][name][when], summary[when], f"{name} {when}")
        # process r read the rows of items r, r + 2, ...: 5 / 9 and 4 / 9 of one process's (not all of them)
        assert one_rows > 0 and [t[name]["rows"] * N_HELDOUT for t in two] == [one_rows * 5, one_rows * 4], name
    _assert_same_metrics(two[0]["direct"], _direct_heldout_metrics(None), "heldout_metrics")
    assert two[0]["direct"]["kl_to_ref"] > 1e-3 and 0 < two[0]["direct"]["sampled_reward"] < 1
