"""Each post-training loss against a small example computed by hand (numbers in the comments)."""

import math

import pytest
import torch

from pyllm.post import losses

LS1 = math.log1p(math.exp(-1.0))  # -log sigmoid(1) = 0.313262


def test_bradley_terry_with_and_without_margin():
    loss, correct = losses.bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    assert loss.tolist() == pytest.approx([LS1, math.log1p(math.e)])  # diff 1 and -1
    assert correct.tolist() == [True, False]
    loss, _ = losses.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=1.0)
    assert loss.item() == pytest.approx(math.log(2.0))  # diff - margin = 0


@pytest.mark.parametrize("variant, beta, expected", [
    ("sigmoid", 0.5, LS1),          # h = (-1 + 2) - (-3 + 2) = 2; beta h = 1
    ("ipo", 0.5, 1.0),              # (h - 1/(2 beta))^2 = (2 - 1)^2
    ("hinge", 0.5, 0.0),            # max(0, 1 - 1)
    ("hinge", 0.1, 0.8),            # max(0, 1 - 0.2)
])
def test_dpo_variants(variant, beta, expected):
    loss, rc, rr = losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                   torch.tensor([-2.0]), beta=beta, variant=variant)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert rc.item() == pytest.approx(beta * 1.0) and rr.item() == pytest.approx(-beta * 1.0)


def test_dpo_label_smoothing_and_bad_variant():
    loss, _, _ = losses.dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]),
                                 torch.tensor([-2.0]), beta=0.5, label_smoothing=0.25)
    assert loss.item() == pytest.approx(0.75 * LS1 + 0.25 * (LS1 + 1.0))  # -log sigmoid(-1) = LS1 + 1
    with pytest.raises(ValueError, match="variant"):
        losses.dpo_loss(*[torch.zeros(1)] * 4, variant="kto")


def test_ppo_policy_loss_clips_only_beyond_the_trust_region():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, clip_frac, _ = losses.ppo_policy_loss(logp, old, adv, mask, clip=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: 1.1
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1) / 3, abs=1e-6)
    assert clip_frac.item() == pytest.approx(1 / 3)
    # a masked-out token changes nothing
    loss2, _, _ = losses.ppo_policy_loss(torch.cat([logp, torch.tensor([[5.0]])], 1), torch.zeros(1, 4),
                                         torch.cat([adv, torch.tensor([[9.0]])], 1), torch.tensor([[1.0, 1, 1, 0]]))
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old = torch.tensor([[0.0, 0.0]])
    values = torch.tensor([[1.0, 0.1]])
    returns = torch.tensor([[1.0, 1.0]])
    # token 0: (1-1)^2 = 0 vs clipped V = 0.2 -> 0.64: 0.64; token 1: 0.81 vs same 0.81
    loss = losses.ppo_value_loss(values, old, returns, torch.ones(1, 2), clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)


def test_gae_hand_computed():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 0.0], [9.0, 1.0, 1.0, 9.0]])
    mask = torch.tensor([[1.0, 1, 1, 0], [0.0, 1, 1, 0]])
    adv, ret = losses.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    # deltas 0.1, 0.1, 0.3 -> A2 = 0.3, A1 = 0.1 + 0.5 * 0.3, A0 = 0.1 + 0.5 * 0.25
    assert adv[0].tolist() == pytest.approx([0.225, 0.25, 0.3, 0.0])
    assert ret[0].tolist() == pytest.approx([0.725, 0.85, 1.0, 0.0])
    # a prompt token before and padding after the response are skipped; gamma 0.9, lambda 1
    adv, ret = losses.gae(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.0, 0.8, 1.0, 0.0])  # A2 = 2 - 1; A1 = 0.9 - 1 + 0.9 * 1
    assert ret[0].tolist() == pytest.approx([0.0, 1.8, 2.0, 0.0])


def test_grpo_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv = losses.grpo_advantages(r, group_size=4, eps=1e-8)
    s = 0.5 / math.sqrt(1 / 3)  # |r - 0.5| / unbiased std sqrt(1/3)
    assert adv.tolist() == pytest.approx([s, -s, -s, s, 0, 0, 0, 0])
    assert losses.grpo_advantages(r, 4, scale=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="group_size"):
        losses.grpo_advantages(r, 3)


def test_grpo_policy_gradient_is_zero_on_groups_of_equal_rewards():
    # group 1 has rewards (1, 0), group 2 (1, 1): only group 1's log-probs get a gradient
    adv = losses.grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2)
    logp = torch.randn(4, 3).requires_grad_()
    mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]])
    loss, _, _ = losses.ppo_policy_loss(logp, logp.detach(), adv[:, None].expand(4, 3), mask, per_sequence=True)
    loss.backward()
    assert logp.grad[2:].abs().max() == 0 and logp.grad[:2].abs().min() == 0  # padding gets none either
    # per sequence: each token of a response weighs 1 / (4 responses x its length), sign = -advantage
    assert logp.grad[0, :2].tolist() == pytest.approx([-adv[0].item() / 8] * 2)
    assert logp.grad[1].tolist() == pytest.approx([-adv[1].item() / 12] * 3)


def test_kl_estimators_and_adaptive_controller():
    logp, ref = torch.tensor([0.0, -1.0]), torch.tensor([-1.0, 0.0])
    assert losses.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([1.0, -1.0])
    assert losses.kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-1) - 1 + 1, math.e - 1 - 1])
    ctl = losses.AdaptiveKLController(coef=0.1, target=6.0, horizon=100)
    assert ctl.update(kl=9.0, n_steps=10) == pytest.approx(0.1 * 1.02)  # error 0.5 clipped to 0.2
    assert ctl.update(kl=5.4, n_steps=10) == pytest.approx(0.1 * 1.02 * 0.99)  # error -0.1


def test_whiten_and_token_logprobs():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = losses.masked_whiten(x, mask)
    assert w[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)  # mean 2, unbiased std 1
    assert losses.masked_whiten(x, mask, shift_mean=False)[0].tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-6)
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    lp = losses.token_logprobs(logits, torch.tensor([[1, -100]]))
    assert lp[0].tolist() == pytest.approx([math.log(0.75), 0.0])
