"""Each stage end to end on a tiny model for a few steps through the Trainer, plus the CLI.

These check the plumbing and the direction of each stage's own objective; the figures that show the
stages doing their job on held-out data at a useful size are in pyllm/post/README.md.
"""

import json

import pytest
import torch

from pyllm.model import load_model
from pyllm.post.cli import main
from pyllm.post.dpo import DPOConfig, dpo
from pyllm.post.grpo import GRPOConfig, grpo
from pyllm.post.heads import RewardModel
from pyllm.post.ppo import PPOConfig, ppo
from pyllm.post.reward import RewardConfig, train_reward_model
from pyllm.post.sft import SFTConfig, sft

MODEL = {"n_layer": 1, "n_head": 2, "d_model": 32}


def quick(**train):
    return {"model": MODEL, "progress": False, "log_every": 1, **train}


def test_sft_with_lora_exports_a_merged_plain_model(sft_dir, tmp_path):
    model = load_model(sft_dir)
    assert model.cfg.n_layer == 1
    # a LoRA run exports a plain (merged) model with the same parameter names
    s = sft(SFTConfig(model=sft_dir, data="builtin:reverse", out_dir=str(tmp_path), max_train=64, max_heldout=8, seq_len=48,
                      lora_rank=2, train=quick(max_steps=2, batch_size=8)))
    assert 0 < s["trainable_params"] < s["total_params"] / 4
    assert set(load_model(s["model_dir"]).state_dict()) == set(model.state_dict())


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_a_stage_from_a_checkpoint_is_reproducible_whatever_was_drawn_before(sft_dir, tmp_path, lora_rank):
    """The reward head and LoRA adapters are random: the stage's seed decides them, not the random numbers the
    process drew before (a pipeline, a test suite, a notebook). Two runs around other draws are equal."""
    histories = []
    for i in range(2):
        torch.rand(5 + i)  # other work in the process
        s = train_reward_model(RewardConfig(model=sft_dir, data="builtin:tasks", out_dir=str(tmp_path / str(i)),
                                            seq_len=48, max_train=64, max_heldout=8, lora_rank=lora_rank,
                                            train=quick(max_steps=3, batch_size=4)))
        histories.append([h["loss"] for h in s["train"]["history"]])
    assert histories[0] == histories[1]


def test_reward_model_learns_task_preferences(sft_dir, tmp_path):
    s = train_reward_model(RewardConfig(model=sft_dir, data="builtin:tasks", out_dir=str(tmp_path), seq_len=48,
                                        max_train=400, max_heldout=64, margin=0.5, train=quick(max_steps=30, lr=3e-3, batch_size=8)))
    assert s["after"]["margin"] > s["before"]["margin"]
    assert RewardModel.load(s["model_dir"]) is not None


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_dpo_cached_reference_equals_reference_model(sft_dir, tmp_path, lora_rank):
    runs = {}
    for cached in (True, False):  # with LoRA the uncached reference is the base with adapters off
        runs[cached] = dpo(DPOConfig(model=sft_dir, data="builtin:tasks", out_dir=str(tmp_path / str(cached)),
                                     seq_len=48, max_train=64, max_heldout=32, precompute_ref=cached,
                                     lora_rank=lora_rank,
                                     train=quick(max_steps=4, lr=1e-3, batch_size=4)))
    losses = [[h["loss"] for h in runs[c]["train"]["history"]] for c in (True, False)]
    # LoRA: the fresh adapters have many near-zero gradient entries whose sign is float noise, and Adam's
    # per-parameter normalisation turns them into full-size steps: the runs drift ~1e-4 apart in 4 steps
    assert losses[0] == pytest.approx(losses[1], rel=1e-4 if lora_rank == 0 else 1e-3)
    s = runs[True]
    assert s["before"]["reward_margin"] == 0.0  # policy == reference at the start
    assert s["after"]["reward_margin"] > 0.0


@pytest.mark.parametrize("variant", ["ipo", "hinge"])
def test_dpo_variants_run(sft_dir, tmp_path, variant):
    s = dpo(DPOConfig(model=sft_dir, data="builtin:tasks", out_dir=str(tmp_path), seq_len=48, max_train=32,
                      max_heldout=16, variant=variant, length_normalize=True, train=quick(max_steps=2, batch_size=4)))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in s["train"]["history"])


def test_grpo_and_ppo_run_rollouts_through_the_trainer(sft_dir, tmp_path):
    g = grpo(GRPOConfig(model=sft_dir, data="builtin:reverse", out_dir=str(tmp_path / "g"), seq_len=48,
                        max_train=64, max_heldout=16, group_size=4, prompts_per_rollout=4, epochs=2,
                        train=quick(max_steps=5, batch_size=8)))
    assert g["rollouts"] == 2  # 16 samples, minibatch 8, 2 epochs: 4 steps per rollout; step 5 needs a second
    assert g["before"]["kl_to_ref"] == 0.0 and g["after"]["kl_to_ref"] >= 0.0
    assert "clip_frac" in g["train"]["history"][0]
    p = ppo(PPOConfig(model=sft_dir, data="builtin:reverse", out_dir=str(tmp_path / "p"), seq_len=48,
                      max_train=64, max_heldout=16, prompts_per_rollout=8, epochs=1, kl_target=0.01, lora_rank=2,
                      train=quick(max_steps=3, batch_size=4)))
    hist = p["train"]["history"]
    assert {"value_loss", "policy_loss", "kl_coef"} <= set(hist[0])
    assert p["final_kl_coef"] != 0.05 or hist[-1]["kl_ref"] == 0.0  # the controller moved unless KL was exactly 0
    # LoRA on the policy; the value head (65 parameters at width 32) trains in full
    assert p["trainable_params"] < p["total_params"] / 4


def test_cli_runs_a_stage_and_reports_bad_input(tmp_path, capsys):
    rc = main(["sft", "--data", "builtin:sort", "--out_dir", str(tmp_path / "cli"), "--max_heldout", "4", "--max_train", "32",
               "--seq_len", "48", "--max_steps", "2", "--batch_size", "4", "--model.n_layer", "1",
               "--model.d_model", "32", "--model.n_head", "2"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stage"] == "sft" and "completion_loss" in report["after"]
    bad = tmp_path / "prefs.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a", "rejected": "a"}\n')
    assert main(["dpo", "--data", str(bad), "--out_dir", str(tmp_path / "d")]) == 2
    assert "prefs.jsonl:2: 'chosen' and 'rejected' are identical" in capsys.readouterr().err
    assert main(["dpo", "--beta", "-1"]) == 2
    assert "beta=-1.0 must be positive" in capsys.readouterr().err
    assert main(["dpo", "--lrr", "1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err
    for args, message in ((["--kl_target", "0"], "kl_target=0.0 must be positive (or None"),
                          (["--lam", "1.5"], "gamma=1.0 and lam=1.5 must be in [0, 1]"),
                          (["--kl_horizon", "0"], "kl_horizon=0 must be positive")):
        assert main(["ppo", *args]) == 2
        assert f"PPOConfig: {message}" in capsys.readouterr().err


def test_a_stage_does_not_resume_another_stages_checkpoint_in_its_out_dir(tmp_path):
    # SFT and DPO of fresh models have the same shapes: DPO silently continued the SFT model
    common = dict(out_dir=str(tmp_path), max_train=32, max_heldout=4, seq_len=48)
    sft(SFTConfig(data="builtin:reverse", train=quick(max_steps=2, batch_size=4), **common))
    with pytest.raises(ValueError, match=r"holds a checkpoint of another run \(step_00000002: stage='sft' "
                                         r"\(this run: 'dpo'\), data='builtin:reverse' \(this run: 'builtin:tasks'\)"):
        dpo(DPOConfig(data="builtin:tasks", train=quick(max_steps=4, batch_size=4), **common))
    # the same stage resumes, with more steps; a changed setting of the stage's own is named
    with pytest.warns(RuntimeWarning, match=r"settings that differ from its run: max_steps 2 -> 3; "
                                            r"stage.heldout_fraction 0.2 -> 0.3$"):
        s = sft(SFTConfig(data="builtin:reverse", train=quick(max_steps=3, batch_size=4), heldout_fraction=0.3,
                          **common))
    assert s["train"]["resumed_from"] == 2


def test_chat_only_sft_writes_strict_json(tmp_path):
    # no single-turn reference answers: exact_match was NaN, a bare NaN token in post_summary.json
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"reverse w{i}abc"},
                                                     {"role": "assistant", "content": f"cba{i}w"}]}) + "\n"
                            for i in range(40)))
    sft(SFTConfig(data=str(data), out_dir=str(tmp_path / "out"), seq_len=48, train=quick(max_steps=1, batch_size=4)))

    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    summary = json.loads((tmp_path / "out" / "post_summary.json").read_text(), parse_constant=refuse)
    assert set(summary["after"]) == {"completion_loss"}
    from pyllm.post.stage import strict_json  # any other non-finite figure is written as null

    assert strict_json({"a": [float("nan"), 1.0, float("-inf")]}) == {"a": [None, 1.0, None]}


@pytest.fixture(scope="module")
def replay_setup(tmp_path_factory, model_with_shards):
    """A tiny fresh model saved with a BPE tokenizer, and pretraining shards made with that tokenizer."""
    return model_with_shards(tmp_path_factory.mktemp("replay"), 30_000, **MODEL)


def test_sft_replay_does_not_depend_on_the_micro_batch_and_resumes_on_another(replay_setup, tmp_path):
    """pretrain_mix 0.375 of a step of 8 rows is 3 replayed windows, however the step is split (it was
    counted per micro-batch: 3 in one micro-batch of 8, 2 + 2 in two of 4), with the same step losses; a
    run checkpointed with micro-batches of 4 resumes with micro-batches of 8 (it was refused: "8 windows
    ... not a whole number of batches of 3 x 1") and goes on as an uninterrupted run."""
    model, shards = replay_setup

    def run(out, micro, steps):
        return sft(SFTConfig(model=model, data="builtin:add", out_dir=str(tmp_path / out), max_train=64,
                             max_heldout=4, max_new_tokens=2, seq_len=48, pretrain_mix=0.375, pretrain_data=shards,
                             train=quick(max_steps=steps, batch_size=8, micro_batch_size=micro, ckpt_every=2)))

    whole = run("whole", 8, 4)
    assert whole["replay_rows"] == 3
    split = run("split", 4, 4)
    assert losses(split) == pytest.approx(losses(whole), rel=1e-5)
    run("resumed", 4, 2)
    with pytest.warns(RuntimeWarning, match="micro_batch_size 4 -> 8"):
        resumed = run("resumed", 8, 4)
    assert resumed["train"]["resumed_from"] == 2
    assert losses(resumed) == pytest.approx(losses(whole)[2:], rel=1e-5)


def losses(summary: dict) -> list[float]:
    return [r["loss"] for r in summary["train"]["history"] if "loss" in r]
