"""DPO's training objective: the DPO-family loss plus, with ``sft_coef``, the chosen rows' NLL."""

import pytest
import torch

from pyllm.post.dpo import DPOConfig, dpo_objective
from pyllm.post.losses import dpo_loss


def _pairs():
    """Token log-probs of 3 chosen then 3 rejected rows of unequal response lengths."""
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 7, generator=g) * 3
    mask = torch.zeros(6, 7, dtype=torch.bool)
    for row, n in enumerate([2, 5, 7, 1, 3, 6]):
        mask[row, 7 - n:] = True
    return logp.requires_grad_(), mask, -torch.rand(3, generator=g) * 10, -torch.rand(3, generator=g) * 10


@pytest.mark.parametrize("length_normalize", [False, True])
def test_sft_coef_adds_the_chosen_rows_per_token_nll(length_normalize):
    logp, mask, ref_c, ref_r = _pairs()
    plain, _ = dpo_objective(DPOConfig(length_normalize=length_normalize), logp, mask, ref_c, ref_r)
    seq = (logp * mask).sum(1) / (mask.sum(1) if length_normalize else 1)
    expected = dpo_loss(seq[:3], seq[3:], ref_c, ref_r, beta=0.1)[0].mean()
    torch.testing.assert_close(plain, expected)
    mixed, metrics = dpo_objective(DPOConfig(length_normalize=length_normalize, sft_coef=0.5), logp, mask, ref_c, ref_r)
    chosen_nll = torch.stack([-logp[r][mask[r]].mean() for r in range(3)]).mean()  # rejected rows excluded
    torch.testing.assert_close(metrics["chosen_nll"], chosen_nll.detach())
    torch.testing.assert_close(mixed, plain + 0.5 * chosen_nll)
    # the NLL term only raises the chosen tokens' log-probs: its gradient on rejected rows is zero
    grad_plain, = torch.autograd.grad(plain, logp)
    grad_mixed, = torch.autograd.grad(mixed, logp)
    torch.testing.assert_close(grad_mixed[3:], grad_plain[3:])
    assert (grad_mixed[:3] - grad_plain[:3])[mask[:3]].lt(0).all()


def test_sft_coef_must_not_be_negative():
    with pytest.raises(ValueError, match="sft_coef=-1.0 must be >= 0"):
        DPOConfig(sft_coef=-1.0)
