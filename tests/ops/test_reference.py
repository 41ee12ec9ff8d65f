"""Every reference op against an independent formula, and its gradients by gradcheck in float64.

The reference (pyllm/ops/reference.py) is the oracle every kernel is judged against, so it is checked
here against code that shares nothing with it: explicit loops over masks, torch.nn.functional's own
losses, torch.optim.AdamW, complex-number rotation, textbook formulas.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from pyllm import ops
from pyllm.ops import reference as ref

F64 = torch.float64


def rand(*shape, requires_grad=False):
    return torch.randn(*shape, dtype=F64, requires_grad=requires_grad)


# ----------------------------------------------------------------------------------------- attention


def attention_by_hand(q, k, v, causal, doc_ids, window, scale):
    """Row by row: each query's allowed keys by explicit conditions, softmax, weighted sum of values."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(Hq):
            kv_head = h // (Hq // Hkv)  # query heads share key/value heads in consecutive groups
            for i in range(T):
                qpos = S - T + i  # queries are the last T positions
                keys = [j for j in range(S)
                        if (not causal or j <= qpos)
                        and (window is None or qpos - j < window)
                        and (doc_ids is None or doc_ids[b, j] == doc_ids[b, qpos])]
                scores = torch.stack([q[b, h, i] @ k[b, kv_head, j] * scale for j in keys])
                weights = torch.exp(scores - scores.max())
                weights = weights / weights.sum()
                out[b, h, i] = sum(w * v[b, kv_head, j] for w, j in zip(weights, keys))
    return out


ATTENTION_CASES = {
    "causal": dict(Hq=2, Hkv=2, T=5, S=5, causal=True),
    "gqa": dict(Hq=4, Hkv=2, T=5, S=5, causal=True),
    "mqa_noncausal": dict(Hq=3, Hkv=1, T=4, S=4, causal=False),
    "doc_ids": dict(Hq=2, Hkv=1, T=7, S=7, causal=True, docs=True),
    "window": dict(Hq=2, Hkv=2, T=6, S=6, causal=True, window=3),
    "decode": dict(Hq=4, Hkv=2, T=1, S=6, causal=True, docs=True),
    "chunk": dict(Hq=2, Hkv=2, T=3, S=7, causal=True, window=4),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_hand_loop_and_explicit(case):
    c = ATTENTION_CASES[case]
    B, D = 2, 8
    q, k, v = rand(B, c["Hq"], c["T"], D), rand(B, c["Hkv"], c["S"], D), rand(B, c["Hkv"], c["S"], D)
    # two documents per row, split at different places; the second row left-padded-like (doc 0 first)
    doc_ids = torch.tensor([[0] * 3 + [1] * (c["S"] - 3), [0] * 2 + [1] * (c["S"] - 2)]) if c.get("docs") else None
    kwargs = dict(causal=c["causal"], doc_ids=doc_ids, window=c.get("window"), softmax_scale=0.3)
    expected = attention_by_hand(q, k, v, c["causal"], doc_ids, c.get("window"), 0.3)
    torch.testing.assert_close(ref.attention(q, k, v, **kwargs), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref.attention_explicit(q, k, v, **kwargs), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [0.0, -0.7])
def test_attention_causal_with_a_zero_or_negative_scale(scale):
    # PyTorch's SDPA with is_causal=True returns nan for a scale <= 0 (its causal shortcut, not the mask);
    # the reference takes that shortcut only for a positive scale
    q, k, v = rand(2, 2, 5, 8), rand(2, 2, 5, 8), rand(2, 2, 5, 8)
    expected = attention_by_hand(q, k, v, True, None, None, scale)
    torch.testing.assert_close(ref.attention(q, k, v, causal=True, softmax_scale=scale), expected)


def test_attention_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = rand(1, 2, 3, 16), rand(1, 2, 3, 16), rand(1, 2, 3, 16)
    expected = attention_by_hand(q, k, v, True, None, None, 1 / math.sqrt(16))
    torch.testing.assert_close(ref.attention(q, k, v), expected)


# ------------------------------------------------------------------------------------- normalisation


def test_layer_norm_formula_and_residual():
    x, r, w, b = rand(3, 5, 11), rand(3, 5, 11), rand(11), rand(11)
    s = x + r
    mean = s.mean(-1, keepdim=True)
    var = ((s - mean) ** 2).mean(-1, keepdim=True)  # biased variance, as LayerNorm
    expected = (s - mean) / torch.sqrt(var + 1e-5) * w + b
    out, new_residual = ref.layer_norm(x, w, b, eps=1e-5, residual=r)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(new_residual, s)
    torch.testing.assert_close(ref.layer_norm(s, w, None), (s - mean) / torch.sqrt(var + 1e-5) * w)


@pytest.mark.parametrize("x_dtype,param_dtypes", [(torch.float32, (torch.bfloat16, torch.bfloat16)),
                                                   (torch.float32, (torch.bfloat16, None)),
                                                   (torch.bfloat16, (torch.float32, torch.bfloat16))])
def test_layer_norm_takes_any_mix_of_float32_and_bfloat16(x_dtype, param_dtypes):
    # F.layer_norm alone refuses these mixes ("mixed dtype (CPU)"); the reference widens the parameters,
    # keeping x's dtype for the output, so it equals the computation on the widened parameters
    x = torch.randn(4, 9).to(x_dtype)
    w = torch.randn(9).to(param_dtypes[0])
    b = torch.randn(9).to(param_dtypes[1]) if param_dtypes[1] is not None else None
    out = ref.layer_norm(x, w, b)
    wide = torch.float32
    expected = F.layer_norm(x, (9,), w.to(wide), b.to(wide) if b is not None else None)
    assert out.dtype == x_dtype
    torch.testing.assert_close(out, expected)


def test_rms_norm_formula_and_residual():
    x, r, w = rand(4, 13), rand(4, 13), rand(13)
    s = x + r
    expected = s / torch.sqrt((s * s).sum(-1, keepdim=True) / 13 + 1e-6) * w
    out, new_residual = ref.rms_norm(x, w, eps=1e-6, residual=r)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(new_residual, s)
    torch.testing.assert_close(ref.rms_norm(s, w), expected)


# ----------------------------------------------------------------------------------------- pointwise


def test_gelu_tanh_and_exact_formulas():
    x, b = rand(6, 9), rand(9)
    y = x + b
    tanh_form = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    exact_form = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    torch.testing.assert_close(ref.bias_gelu(x, b, approximate="tanh"), tanh_form)
    torch.testing.assert_close(ref.bias_gelu(x, b, approximate="none"), exact_form)
    torch.testing.assert_close(ref.bias_gelu(y, None, approximate="none"), exact_form)


def test_swiglu_formula():
    gate, up = rand(5, 7), rand(5, 7)
    torch.testing.assert_close(ref.swiglu(gate, up), gate / (1 + torch.exp(-gate)) * up)


def rope_by_complex(x, angles):
    """Rotate each pair (x[i], x[i + D/2]) as the complex number x[i] + i x[i + D/2] by e^{i angle}."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_is_complex_rotation(per_batch):
    B, T, D = 2, 5, 8
    q, k = rand(B, 4, T, D), rand(B, 2, T, D)
    positions = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]]) if per_batch else torch.arange(T)
    inv_freq = 10000.0 ** (-torch.arange(0, D, 2, dtype=F64) / D)
    angles = positions[..., None].to(F64) * inv_freq  # (T, D/2) or (B, T, D/2)
    q_rot, k_rot = ref.rope(q, k, angles.cos(), angles.sin())
    a = angles[:, None] if per_batch else angles  # broadcast over heads
    torch.testing.assert_close(q_rot, rope_by_complex(q, a))
    torch.testing.assert_close(k_rot, rope_by_complex(k, a))


def test_softmax_formula():
    x = rand(3, 17) * 10
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    torch.testing.assert_close(ref.softmax(x), e / e.sum(-1, keepdim=True))


# -------------------------------------------------------------------------------------------- matmul


def test_matmul_and_linear_formulas():
    a, b = rand(4, 6), rand(6, 3)
    torch.testing.assert_close(ref.matmul(a, b), (a[:, :, None] * b[None]).sum(1))
    x, w, bias = rand(2, 3, 6), rand(5, 6), rand(5)
    y = (x[..., None, :] * w).sum(-1) + bias
    torch.testing.assert_close(ref.linear(x, w, bias), y)
    torch.testing.assert_close(ref.linear(x, w, bias, activation="gelu"), 0.5 * y * (1 + torch.erf(y / math.sqrt(2))))
    tanh_form = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    torch.testing.assert_close(ref.linear(x, w, None, activation="gelu_tanh"), F.gelu(y - bias, approximate="tanh"))
    torch.testing.assert_close(ref.linear(x, w, bias, activation="gelu_tanh"), tanh_form)


# ------------------------------------------------------------------------------------ cross-entropy


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_torch(reduction, label_smoothing):
    logits = rand(3, 4, 11)
    target = torch.randint(0, 11, (3, 4))
    target[0, 1] = target[2, 3] = -100
    expected = F.cross_entropy(logits.reshape(-1, 11), target.reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing, reduction=reduction)
    out = ref.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    torch.testing.assert_close(out, expected.reshape(target.shape) if reduction == "none" else expected)


def test_cross_entropy_z_loss_by_hand():
    logits, target = rand(6, 9), torch.tensor([1, 2, -1, 4, 5, 8])
    lse = torch.log(torch.exp(logits).sum(-1))
    per_row = lse - logits[torch.arange(6), target.clamp(min=0)] + 1e-3 * lse ** 2
    valid = target != -1
    expected = per_row[valid].sum() / valid.sum()
    torch.testing.assert_close(ref.cross_entropy(logits, target, ignore_index=-1, z_loss=1e-3), expected)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    out = ref.cross_entropy(rand(3, 5), torch.full((3,), -100))
    assert out.item() == 0.0


def test_linear_cross_entropy_is_cross_entropy_of_linear():
    h, w, b, t = rand(2, 5, 6), rand(13, 6), rand(13), torch.randint(0, 13, (2, 5))
    expected = F.cross_entropy((h @ w.T + b).reshape(-1, 13), t.reshape(-1), label_smoothing=0.2)
    torch.testing.assert_close(ref.linear_cross_entropy(h, w, t, b, label_smoothing=0.2), expected)


# ------------------------------------------------------------------------------- optimiser & scaling


def test_adamw_step_matches_torch_adamw():
    torch.manual_seed(1)
    params = [torch.randn(5, 3), torch.randn(7)]
    torch_params = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.AdamW(torch_params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for step in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        for tp, g in zip(torch_params, grads):
            tp.grad = g.clone()
        opt.step()
        ref.adamw_step(params, grads, m, v, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step)
        for p, tp in zip(params, torch_params):
            torch.testing.assert_close(p, tp.detach(), rtol=1e-6, atol=1e-7)
    for i, tp in enumerate(torch_params):
        torch.testing.assert_close(m[i], opt.state[tp]["exp_avg"])
        torch.testing.assert_close(v[i], opt.state[tp]["exp_avg_sq"])


def test_adamw_step_master_weights_and_skip_on_inf():
    torch.manual_seed(2)
    master = [torch.randn(4, 4)]
    low = [master[0].to(torch.bfloat16)]
    torch_param = master[0].clone().requires_grad_()
    opt = torch.optim.AdamW([torch_param], lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    m, v = [torch.zeros(4, 4)], [torch.zeros(4, 4)]
    grad = torch.randn(4, 4)
    torch_param.grad = grad.clone()
    opt.step()
    ref.adamw_step(low, [grad.to(torch.bfloat16)], m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                   weight_decay=0.01, step=1, master_params=master, found_inf=torch.zeros(1))
    # bf16 gradient: the update sees the gradient rounded to bf16; Adam's first step is ~sign(g), so
    # the master weight matches torch's to within lr * (rounding effect), far below one bf16 ulp of p
    torch.testing.assert_close(master[0], torch_param.detach(), rtol=0, atol=1e-5)
    assert low[0].dtype == torch.bfloat16 and torch.equal(low[0], master[0].to(torch.bfloat16))
    before = [master[0].clone(), m[0].clone(), v[0].clone()]
    ref.adamw_step(low, [torch.full((4, 4), float("inf"), dtype=torch.bfloat16)], m, v, lr=1e-3, beta1=0.9,
                   beta2=0.95, eps=1e-8, weight_decay=0.01, step=2, master_params=master,
                   found_inf=torch.ones(1))
    for after, b in zip((master[0], m[0], v[0]), before):
        assert torch.equal(after, b)


def test_unscale_and_check():
    grads = [torch.tensor([2.0, 4.0]), torch.tensor([[8.0]])]
    found = torch.zeros(1)
    ref.unscale_and_check_(grads, 0.5, found)
    assert grads[0].tolist() == [1.0, 2.0] and grads[1].tolist() == [[4.0]] and found.item() == 0.0
    grads = [torch.tensor([1.0]), torch.tensor([float("nan"), 1.0]), torch.tensor([3.0])]
    ref.unscale_and_check_(grads, torch.tensor(2.0), found)
    assert found.item() == 1.0 and grads[2].item() == 6.0
    ref.unscale_and_check_([torch.tensor([1.0])], 1.0, found)  # a clean call never clears the flag
    assert found.item() == 1.0
    found = torch.zeros(1)
    ref.unscale_and_check_([torch.tensor([float("-inf")])], 1.0, found)
    assert found.item() == 1.0


def test_update_loss_scale():
    scale, tracker = torch.tensor([1024.0]), torch.tensor([0], dtype=torch.int32)
    clean, overflow = torch.zeros(1), torch.ones(1)
    ref.update_loss_scale_(scale, tracker, clean, growth_interval=3)
    ref.update_loss_scale_(scale, tracker, clean, growth_interval=3)
    assert (scale.item(), tracker.item()) == (1024.0, 2)
    ref.update_loss_scale_(scale, tracker, clean, growth_interval=3)  # third clean step: grow
    assert (scale.item(), tracker.item()) == (2048.0, 0)
    ref.update_loss_scale_(scale, tracker, clean, growth_interval=3)
    ref.update_loss_scale_(scale, tracker, overflow, growth_interval=3)  # overflow: back off, reset
    assert (scale.item(), tracker.item()) == (1024.0, 0)
    ref.update_loss_scale_(scale, tracker, overflow, backoff_factor=0.25, growth_interval=3)
    assert (scale.item(), tracker.item()) == (256.0, 0)


# ----------------------------------------------------------------------------------- gradients (fp64)


def _doc_ids():
    return torch.tensor([[0, 0, 1, 1, 1], [2, 2, 2, 3, 3]])


GRAD_CASES = {
    "attention_gqa": (lambda q, k, v: ops.attention(q, k, v, backend="torch"),
                      lambda: (rand(1, 4, 5, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4))),
    "attention_docs_window": (lambda q, k, v: ops.attention(q, k, v, doc_ids=_doc_ids(), window=2, backend="torch"),
                              lambda: (rand(2, 2, 5, 2), rand(2, 1, 5, 2), rand(2, 1, 5, 2))),
    "attention_decode": (lambda q, k, v: ops.attention(q, k, v, backend="torch"),
                         lambda: (rand(1, 2, 2, 4), rand(1, 2, 5, 4), rand(1, 2, 5, 4))),
    "layer_norm_residual": (lambda x, w, b, r: ops.layer_norm(x, w, b, residual=r, backend="torch"),
                            lambda: (rand(3, 7), rand(7), rand(7), rand(3, 7))),
    "rms_norm_residual": (lambda x, w, r: ops.rms_norm(x, w, residual=r, backend="torch"),
                          lambda: (rand(3, 7), rand(7), rand(3, 7))),
    "bias_gelu_tanh": (lambda x, b: ops.bias_gelu(x, b, backend="torch"), lambda: (rand(3, 5), rand(5))),
    "bias_gelu_exact": (lambda x, b: ops.bias_gelu(x, b, approximate="none", backend="torch"),
                        lambda: (rand(3, 5), rand(5))),
    "swiglu": (lambda g, u: ops.swiglu(g, u, backend="torch"), lambda: (rand(3, 5), rand(3, 5))),
    "rope": (lambda q, k, c, s: ops.rope(q, k, c, s, backend="torch"),
             lambda: (rand(1, 2, 3, 4), rand(1, 1, 3, 4), rand(3, 2), rand(3, 2))),
    "softmax": (lambda x: ops.softmax(x, backend="torch"), lambda: (rand(3, 6),)),
    "matmul": (lambda a, b: ops.matmul(a, b, backend="torch"), lambda: (rand(3, 4), rand(4, 5))),
    "linear_gelu": (lambda x, w, b: ops.linear(x, w, b, activation="gelu_tanh", backend="torch"),
                    lambda: (rand(2, 3, 4), rand(5, 4), rand(5))),
    "cross_entropy": (lambda x: ops.cross_entropy(x, torch.tensor([1, -100, 4, 0]), label_smoothing=0.1,
                                                  z_loss=1e-2, backend="torch"),
                      lambda: (rand(4, 6),)),
    "linear_cross_entropy": (lambda h, w, b: ops.linear_cross_entropy(h, w, torch.tensor([[2, 0, -100]]), b,
                                                                      reduction="sum", backend="torch"),
                             lambda: (rand(1, 3, 4), rand(5, 4), rand(5))),
}


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradcheck(case):
    fn, make = GRAD_CASES[case]
    inputs = tuple(t.requires_grad_() for t in make())
    # fast_mode checks the Jacobian along random directions: the same test at a fraction of the cost
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
