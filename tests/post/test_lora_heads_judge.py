"""LoRA adapters, scalar heads and judges."""

import pytest
import torch

from pyllm.model import Transformer, preset
from pyllm.post.datasets import is_heldout, task_pairs, task_reward
from pyllm.post.chat import ChatTemplate
from pyllm.post.heads import PolicyWithValue, RewardModel
from pyllm.post.judge import ModelJudge, RuleJudge, relabel
from pyllm.post.lora import BaseModelView, LoRAConfig, apply_lora, merge_lora, trainable_parameters
from pyllm.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def tiny(**kw):
    return Transformer(preset("tiny", n_layer=2, d_model=32, n_head=2, vocab_size=TOK.vocab_size, **kw))


def test_lora_trains_only_adapters_and_merges_exactly():
    model = tiny()
    x = torch.randint(0, 256, (2, 12))
    base_out = model(x).detach()
    base_weight = model.blocks[0].attn.qkv.weight.detach().clone()
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert len(names) == 2 * 4  # qkv, proj, fc, proj in each of 2 blocks
    torch.testing.assert_close(model(x), base_out)  # B = 0: the adapted model starts equal to the base
    trainable, total = trainable_parameters(model)
    assert trainable == sum(4 * (w.shape[0] + w.shape[1]) for w in
                            (m.parametrizations.weight.original for n, m in model.named_modules() if n in names))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    adapted = model(x).detach()
    assert not torch.allclose(adapted, base_out, atol=1e-4)
    torch.testing.assert_close(BaseModelView(model)(x), base_out)  # adapters off: the frozen start, no copy
    torch.testing.assert_close(model(x), adapted)  # and back on afterwards
    torch.testing.assert_close(model.blocks[0].attn.qkv.parametrizations.weight.original, base_weight)  # frozen
    assert merge_lora(model) == 8
    assert set(dict(model.named_parameters())) == set(dict(tiny().named_parameters()))  # plain model again
    assert all(p.requires_grad for p in model.parameters())  # not only the merged weights
    torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


def test_a_second_apply_lora_is_refused():
    """It stacked a second adapter on each weight and froze the first one."""
    model = tiny()
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"^apply_lora: the model already has LoRA adapters; merge_lora"):
        apply_lora(model, LoRAConfig(rank=2))
    merge_lora(model)
    assert len(apply_lora(model, LoRAConfig(rank=2))) == 8  # after a merge: a new set


def test_heads_shapes_and_reward_model_roundtrip(tmp_path):
    rm = RewardModel(tiny())
    x = torch.randint(0, 256, (3, 10))
    attention = torch.ones(3, 10)
    attention[1, 6:] = 0  # row 1 has 6 real tokens
    scores = rm(x, attention)
    assert scores.shape == (3,)
    # the score of a right-padded row is that of the row alone
    torch.testing.assert_close(scores[1], rm(x[1:2, :6], torch.ones(1, 6))[0], rtol=1e-5, atol=1e-5)
    loaded = RewardModel.load(rm.save(tmp_path / "rm", TOK))
    torch.testing.assert_close(loaded(x, attention), scores)
    logits, values = PolicyWithValue(tiny())(x)
    assert logits.shape == (3, 10, TOK.vocab_size) and values.shape == (3, 10)
    assert values.abs().max() == 0  # zero-initialised value head


@pytest.mark.parametrize("shared", [False, True])
def test_value_loss_trains_the_trunk_only_when_shared(shared):
    model = PolicyWithValue(tiny(), shared_trunk=shared)
    torch.nn.init.normal_(model.value_head.proj.weight)
    _, values = model(torch.randint(0, TOK.vocab_size, (2, 5)))
    values.square().sum().backward()
    trunk = [p.grad for n, p in model.named_parameters() if not n.startswith("value_head")]
    assert model.value_head.proj.weight.grad.abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for g in trunk) == shared


def test_rule_judge_agrees_with_task_labels_and_relabels_flipped_pairs():
    pairs = task_pairs(n=60)
    flipped = [p.__class__(p.prompt, p.rejected, p.chosen) for p in pairs[:20]] + pairs[20:]
    out, report = relabel(RuleJudge(task_reward), flipped)
    assert report["judge_agreement"] == pytest.approx(40 / 60)
    assert all(o.chosen == p.chosen for o, p in zip(out, pairs))  # every pair restored to the right order


def test_model_judge_is_order_symmetric():
    judge = ModelJudge(tiny().eval(), ChatTemplate(TOK))
    with torch.no_grad():
        ab = judge.prefer(["1+1="], ["2"], ["3"])
        ba = judge.prefer(["1+1="], ["3"], ["2"])
    assert 0.0 < ab[0] < 1.0
    assert ab[0] + ba[0] == pytest.approx(1.0)  # asked both ways: position bias cancels


def test_python_rules_by_spec_and_bad_specs():
    from pyllm.post.judge import judge_from_spec
    from pyllm.post.rollout import make_reward_fn

    tpl = ChatTemplate(TOK)
    judge = judge_from_spec("py:pyllm.post.datasets:task_reward", tpl, 64, "cpu")
    _, report = relabel(judge, task_pairs(n=30))
    assert report["judge_agreement"] == 1.0
    reward = make_reward_fn(lambda p, r: len(r), tpl, 64, "cpu")
    assert reward(["a", "b"], ["xy", ""]) == [2.0, 0.0]
    with pytest.raises(ValueError, match="cannot load function 'nope' from module 'pyllm.post.datasets'"):
        judge_from_spec("py:pyllm.post.datasets:nope", tpl, 64, "cpu")
    with pytest.raises(ValueError, match="judge='oracle'"):
        judge_from_spec("oracle", tpl, 64, "cpu")


def test_judge_training_data_matches_the_judge_question():
    from pyllm.post.datasets import BUILTIN_EXAMPLES
    from pyllm.post.judge import DEFAULT_PRINCIPLE, judge_question

    pairs = task_pairs(n=200)
    examples = BUILTIN_EXAMPLES["judge_tasks"]()[:200]
    assert {e.completion for e in examples} == {"A", "B"}
    for pair, ex in zip(pairs, examples):
        first, second = (pair.chosen, pair.rejected) if ex.completion == "A" else (pair.rejected, pair.chosen)
        assert ex.prompt == judge_question(DEFAULT_PRINCIPLE, pair.prompt, first, second)
        assert ex.heldout == is_heldout(pair.prompt, 0.2)  # held out exactly where the pair is


@pytest.mark.parametrize("bad,match", [(float("nan"), "returned nan; rewards must be finite"),
                                       (None, "returned None, not a number")])
def test_rule_judge_refuses_a_rule_that_returns_nan_or_none_naming_rule_and_pair(bad, match):
    # nan compared False both ways, so the pair was silently swapped with confidence 1.0; None raised a bare
    # TypeError
    from pyllm.post.datasets import Pair

    def rule(prompt, response):
        return bad if response.startswith("good") else 0.0

    pairs = [Pair("q0", "fine", "bad", "prefs.jsonl:1"), Pair("q1", "good answer", "bad", "prefs.jsonl:2")]
    with pytest.raises(ValueError, match=rf"^prefs.jsonl:2: reward '.*rule' on prompt 'q1', response 'good answer' "
                                         f"{match}"):
        relabel(RuleJudge(rule), pairs)


def test_reward_model_judge_names_the_file_and_line_of_an_over_long_pair():
    from pyllm.post.datasets import DataError, Pair
    from pyllm.post.judge import RewardModelJudge

    judge = RewardModelJudge(RewardModel(tiny()).eval(), ChatTemplate(TOK), max_len=32)
    pairs = [Pair("1+1=", "2", "3", "prefs.jsonl:1"), Pair("1+1=", "x" * 40, "3", "prefs.jsonl:2")]
    with pytest.raises(DataError, match=r"^prefs.jsonl:2: example is \d+ tokens, longer than the context \(32\)"):
        relabel(judge, pairs)


@pytest.mark.parametrize("name", ["model.safetensors", "reward_head.safetensors"])
def test_truncated_weights_are_a_one_line_error_naming_the_file(tmp_path, name):
    # an interrupted copy: the reader's SafetensorError traceback named no file
    directory = RewardModel(tiny()).save(tmp_path / "rm", TOK)
    raw = (directory / name).read_bytes()
    (directory / name).write_bytes(raw[:len(raw) // 2])
    with pytest.raises(ValueError, match=rf"^{directory / name}: not a readable safetensors file \(.*\); it is "
                                         "damaged or incomplete"):
        RewardModel.load(directory)
