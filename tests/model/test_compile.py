"""torch.compile traces the whole model forward in one graph (fullgraph: no graph breaks, so the op
registry's backend selection is dynamo-friendly) and matches eager, on CPU."""

import pytest
import torch

from pyllm.model import Transformer, preset
from pyllm.ops import registry

# raised inside torch's own compile stack, not by pyllm
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("name, backend", [("tiny_llama", None), ("tiny", "torch")])
def test_compiled_forward_matches_eager(name, backend):
    # backend None: automatic choice (kernel custom ops where registered); "torch": the model's
    # use_backend context around the reference ops
    model = Transformer(preset(name, n_layer=2, d_model=64, vocab_size=64, backend=backend)).eval()
    idx = torch.randint(0, 64, (2, 16))
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx), rtol=1e-5, atol=1e-5)


def test_fallback_under_compile_warns_and_matches_eager(monkeypatch):
    # the "cpu" backend takes only float32: every op it has falls back to the reference, with the
    # warning emitted while dynamo traces (backend="eager": dynamo only, no code generation)
    monkeypatch.setattr(registry, "_WARNED", set())
    model = Transformer(preset("tiny", n_layer=1, d_model=32, vocab_size=64, backend="cpu")).double().eval()
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="backend 'cpu' not used"):
            out = torch.compile(model, fullgraph=True, backend="eager")(idx)
        torch.testing.assert_close(out, model(idx))


def test_compiled_loss_and_gradients_match_eager():
    # the training path: loss forward + backward through AOT autograd (backend="aot_eager": no code
    # generation), on the reference ops
    model = Transformer(preset("tiny_llama", n_layer=1, d_model=32, vocab_size=64, backend="torch", fused_loss=False))
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    loss = torch.compile(model.loss, fullgraph=True, backend="aot_eager")(idx, targets)
    loss.backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model.loss(idx, targets)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    for g, p in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(g, p.grad)
