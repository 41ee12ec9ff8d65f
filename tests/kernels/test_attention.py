"""FlashAttention-2 Triton kernel vs the reference (SDPA with reference.attention_mask): forward and
dq/dk/dv, causal and not, grouped-/multi-query heads, decode alignment (T < S), packed documents,
sliding window, head dims that are not powers of two; determinism of the backward on GPU."""

import pytest
import torch

from pyllm import ops
from kernel_checks import DEVICE, check_op, kernel_dtypes, requires_gpu, strict_backend  # noqa: F401

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("strict_backend")]


def _qkv(B, Hq, Hkv, T, S, D):
    return [torch.randn(B, h, n, D, dtype=torch.float64, device=DEVICE) for h, n in ((Hq, T), (Hkv, S), (Hkv, S))]


def _attn(**kw):
    return lambda q, k, v, backend: ops.attention(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D,causal", [
    (1, 1, 1, 1, 1, 16, True),      # a single token
    (2, 4, 2, 19, 37, 24, True),    # GQA, decode alignment (queries are the last 19 of 37), D padded to 32
    (1, 2, 2, 17, 17, 40, False),   # non-causal, D padded to 64
])
def test_attention(dtype, B, Hq, Hkv, T, S, D, causal):
    check_op(_attn(causal=causal), _qkv(B, Hq, Hkv, T, S, D), dtype)


def test_attention_packed_documents_unsorted_ids():
    """Arbitrary (not sorted) document ids: the block-skip test on id ranges must stay exact."""
    doc = torch.randint(0, 3, (2, 29), device=DEVICE)
    check_op(_attn(doc_ids=doc), _qkv(2, 2, 1, 29, 29, 16), torch.float32)


def test_attention_window_docs_decode():
    doc = torch.sort(torch.randint(0, 3, (1, 34), device=DEVICE), dim=1).values
    check_op(_attn(doc_ids=doc, window=9), _qkv(1, 4, 1, 11, 34, 16), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_wide_window(causal):
    """A window of several 16-blocks: masked lower edge, unmasked middle and masked diagonal ranges."""
    check_op(_attn(causal=causal, window=37, softmax_scale=0.3), _qkv(1, 2, 1, 45, 70, 16), torch.float32)


def test_attention_window_noncausal_fp16():
    check_op(_attn(causal=False, window=4), _qkv(1, 2, 2, 21, 21, 16), torch.float16)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_gpu(dtype, D, causal):
    check_op(_attn(causal=causal), _qkv(2, 8, 2, 1023, 1023, D), dtype)


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_gpu_decode_docs_window(dtype):
    doc = torch.sort(torch.randint(0, 7, (2, 4097), device=DEVICE), dim=1).values
    check_op(_attn(doc_ids=doc, window=1000), _qkv(2, 8, 1, 129, 4097, 128), dtype)
    check_op(_attn(), _qkv(3, 4, 4, 1, 4097, 64), dtype)


@requires_gpu
def test_attention_gpu_refuses_fp32_head_dims_its_backward_cannot_fit(monkeypatch):
    """fp32 at head dim 129-256: every backward tile config needs more shared memory than an H100 has, so
    the op is refused (strict mode) rather than failing at launch; bf16 at 256 and fp32 at 128 run."""
    from pyllm.ops.registry import BackendError

    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")
    with pytest.raises(BackendError, match="head dim 256 > 128"):
        ops.attention(*(t.float() for t in _qkv(1, 2, 2, 64, 64, 256)), backend="triton")
    check_op(_attn(), _qkv(1, 2, 2, 100, 100, 128), torch.float32)


@requires_gpu
def test_attention_backward_is_deterministic():
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in _qkv(2, 16, 4, 2048, 2048, 128))
    do = torch.randn_like(q)
    grads = []
    for _ in range(2):
        out = ops.attention(q, k, v, backend="triton")
        grads.append(torch.autograd.grad(out, (q, k, v), do))
    for a, b in zip(*grads):
        assert torch.equal(a, b)
