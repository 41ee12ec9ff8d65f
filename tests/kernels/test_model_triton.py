"""Golden test: tiny GPT-2- and Llama-style models trained a few steps with every op on the Triton
backend (strict: no silent fallback) follow the reference backend's losses."""

import pytest
import torch

from pyllm import ops
from pyllm.model import Transformer, preset
from kernel_checks import DEVICE, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]

STEPS = 3


def _train(name, backend):
    torch.manual_seed(0)
    cfg = preset(name, n_layer=2, n_head=2, d_model=32, vocab_size=67, max_seq_len=16, backend=backend,
                 **({"n_kv_head": 1} if name == "tiny_llama" else {}))
    model = Transformer(cfg).to(DEVICE)
    params = [p for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg.vocab_size, (2, 13), generator=gen).to(DEVICE)
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    doc_ids = torch.tensor([[0] * 6 + [1] * 7, [0] * 13], device=DEVICE)  # two packed documents in row 0
    losses = []
    for step in range(1, STEPS + 1):
        loss = model.loss(idx, targets, doc_ids=doc_ids)
        loss.backward()
        grads = [p.grad for p in params]
        found_inf = torch.zeros(1, device=DEVICE)
        ops.unscale_and_check_(grads, 1.0, found_inf, backend=backend)
        ops.adamw_step(params, grads, m, v, lr=3e-3, weight_decay=0.1, step=step, found_inf=found_inf,
                       backend=backend)
        for p in params:
            p.grad = None
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["tiny", "tiny_llama"])
def test_tiny_model_losses_match_reference(name):
    want = _train(name, "torch")
    got = _train(name, "triton")
    assert want[-1] < want[0]  # the run actually trains
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-5)
