"""The CUDA kernels (csrc/cuda, backend "cuda") against the reference and against the Triton backend,
forward and backward, in float32/float16/bfloat16 (csrc_checks.check; PYLLM_STRICT_BACKEND=1).

Every test here needs a CUDA device and a pyllm._C built with nvcc; on a machine without a GPU they
are skipped (CI still compiles the kernels: a CUDA build error fails the install), unless
PYLLM_CUDA_EMULATOR=1: then they run on the CPU over the CUDA emulator (tests/csrc/cuda_emulator: the
kernels compiled as host C++, CPU tensors standing in for device memory; test_cuda_emulated.py runs
them so in CI, all but the 70001-row cross-entropy). What only a GPU can show is skipped there (`gpu_only`): other devices, the
Triton cross-checks, tensors too large for the emulator's speed.
"""

import functools
import math
import os

import pytest
import torch

from pyllm import ops
from pyllm.ops import reference
from pyllm.ops.registry import BackendError, dispatch
from pyllm.ops.tolerance import assert_close, error_bound

from csrc_checks import check

EMULATED = os.environ.get("PYLLM_CUDA_EMULATOR") == "1"
if EMULATED:
    import cuda_emulator

    cuda_emulator.install()

HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
gpu_only = pytest.mark.skipif(EMULATED, reason="needs a real GPU (not run by the CUDA emulator)")
pytestmark = [] if EMULATED else requires_gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
DEV = "cpu" if EMULATED else "cuda"
BACKEND = "cuda"  # the backend under test


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    monkeypatch.setenv("PYLLM_STRICT_BACKEND", "1")


def _triton_has(op):
    return not EMULATED and "triton" in ops.ops_table().get(op, [])


def _check(op, args, dtype, n_grad=None, **kwargs):
    other = "triton" if _triton_has(op) else None
    check(op, BACKEND, args, dtype, n_grad=n_grad, compare_with=other, **kwargs)


def _shape_id(shape):
    return "x".join(map(str, shape))  # test ids like "13x3072", so -k can pick a shape


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, device=DEV) * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 7), (17, 127), (64, 768), (5, 1023), (4, 1024), (3, 4099),
                                    (2, 8192)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_norms(dtype, rows, n, with_residual):
    x, w, b = _randn(rows, n, scale=3), _randn(n), _randn(n)
    extra = {"residual": _randn(rows, n)} if with_residual else {}
    _check("layer_norm", [x, w, b], dtype, **extra)
    _check("rms_norm", [x, w], dtype, **extra)


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layer_norm_over_one_element_has_zero_input_gradient(eps):
    """LayerNorm over a single element gives its bias whatever x: dx is exactly 0. The formula's rounding
    (dy * w - mg, contracted to an FMA) times rstd = 1/sqrt(eps) was ~0.02 at eps = 1e-12 in the CPU kernel."""
    x, w, b = _randn(6, 1).requires_grad_(), _randn(1), _randn(1)
    ops.layer_norm(x, w, b, eps=eps, backend=BACKEND).backward(_randn(6, 1))
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(3, 0), (0, 5)], ids=_shape_id)
def test_empty_rows_or_width(shape):
    """Zero rows or a zero width, forward and backward: the dweight/dbias column reductions once launched
    a grid of 0 column tiles for width 0 ('invalid configuration argument'). Cross-entropy: zero rows."""
    x, w = _randn(*shape), _randn(shape[-1])
    for dtype in HALF:  # against the reference only: empty shapes are not what the Triton cross-check is for
        check("layer_norm", BACKEND, [x, w, w], dtype)
        check("rms_norm", BACKEND, [x, w], dtype, residual=_randn(*shape))
        check("bias_gelu", BACKEND, [x, w], dtype)
        check("swiglu", BACKEND, [x, x], dtype)
        if shape[-1]:  # a vocabulary of 0 classes is not a valid input
            check("cross_entropy", BACKEND, [x, torch.zeros(shape[0], dtype=torch.long, device=DEV)], dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n", [768, 4099])
def test_norm_with_unused_residual_sum(dtype, n):
    """The final norm of a pre-norm model: the residual sum h is returned but never used, so its gradient
    is None (no dh_extra pointer) while x and residual still get dy's gradient."""
    x, r, w, b = _randn(6, n, scale=3), _randn(6, n), _randn(n), _randn(n)
    dy = torch.randn(6, n, dtype=torch.float64, device=DEV)
    grads = {}
    for name, backend, cast in (("truth", "torch", torch.double), ("ref", "torch", dtype),
                                ("kern", BACKEND, dtype)):
        leaves = [t.to(cast).requires_grad_() for t in (x, r, w, b)]
        y, _ = ops.layer_norm(leaves[0], leaves[2], leaves[3], residual=leaves[1], backend=backend)
        grads[name] = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    for i, (k, t, r_) in enumerate(zip(grads["kern"], grads["truth"], grads["ref"])):
        assert_close(k, t, r_, f"layer_norm gradient {i} with the residual sum unused")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (13, 3072), (2, 5, 257)], ids=_shape_id)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_bias_gelu(dtype, shape, approximate):
    x = _randn(*shape, scale=3)
    _check("bias_gelu", [x, _randn(shape[-1])], dtype, approximate=approximate)
    _check("bias_gelu", [x], dtype, approximate=approximate)


@gpu_only
@pytest.mark.parametrize("dtype", HALF)
def test_pointwise_beyond_the_grid_cap(dtype):
    """More elements than one pass of the capped grid (524280 blocks x 256 threads, one element each at
    an odd width; 134M elements, ~8 GB with the fp64 truth): the grid-stride loops must cover the rest."""
    width = 2049
    rows = 524280 * 256 // width + 3
    x = _randn(rows, width, scale=3)
    _check("bias_gelu", [x, _randn(width)], dtype)
    _check("swiglu", [x, _randn(rows, width)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 129), (3, 11, 1024)], ids=_shape_id)
def test_swiglu(dtype, shape):
    _check("swiglu", [_randn(*shape, scale=3), _randn(*shape)], dtype)


def _check_on_views(op, views, **kwargs):
    """check() for inputs whose layout matters (strided or offset views, kept as they are): the cuda
    backend vs the reference in fp64 (truth) and in the views' dtype, output and the gradient of every
    floating input under one shared upstream gradient."""
    def run(backend, tensors, dy=None):
        # detach() keeps a view's strides; integer tensors (targets) are passed as they are
        args = [t.detach().requires_grad_() if t.is_floating_point() else t for t in tensors]
        leaves = [a for a in args if a.requires_grad]
        out = getattr(ops, op)(*args, backend=backend, **kwargs)
        dy = torch.randn(out.shape, dtype=torch.float64, device=DEV) if dy is None else dy
        return [out, *torch.autograd.grad(out, leaves, dy.to(out.dtype))], dy

    truth, dy = run("torch", [t.double() if t.is_floating_point() else t for t in views])
    ref, _ = run("torch", views, dy)
    kern, _ = run(BACKEND, views, dy)
    for i, (k, t, r) in enumerate(zip(kern, truth, ref)):
        assert_close(k, t, r, f"{op} on views, {'output' if i == 0 else f'gradient of input {i - 1}'}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 67])
def test_swiglu_on_chunks_of_a_fused_projection(dtype, width):
    """gate and up as the two halves of one (rows, 2 width) projection: read through their row stride
    (width 64) or copied (width 67: up's base is not 16-byte aligned)."""
    _check_on_views("swiglu", list(_randn(2, 9, 2 * width, scale=3).to(dtype).chunk(2, dim=-1)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_gate_and_up_with_different_row_strides(dtype):
    """gate a chunk of a fused projection (row stride 2 x 64), up a plain tensor (row stride 64): a swap
    of the two strides between the wrapper and the kernel shows here and nowhere else."""
    gate = _randn(9, 2 * 64, scale=3).to(dtype)[:, :64]
    _check_on_views("swiglu", [gate, _randn(9, 64).to(dtype)])
    _check_on_views("swiglu", [_randn(9, 64, scale=3).to(dtype), _randn(9, 2 * 64).to(dtype)[:, 64:]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_strided_vectors(dtype):
    """1-D views with a stride (every other element): the kernel reads a row as contiguous, so these must
    be copied; they were once passed as they were and the kernel read the wrong elements."""
    pairs = _randn(515, 2, scale=3).to(dtype)
    gate, up = pairs[:, 0], pairs[:, 1]
    assert gate.stride() == (2,)
    _check_on_views("swiglu", [gate, up])


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_on_rows_behind_a_size_one_dim_of_any_stride(dtype):
    """(2, 1, 3, 64) with strides (S, S, 64, 1), S not 3 x 64: the rows are not evenly strided, so they must
    be copied (the old stride test skipped the size-1 dim and passed them; rows were read at r x 64)."""
    base = _randn(2 * 400, scale=3).to(dtype)
    gate = base.as_strided((2, 1, 3, 64), (400, 400, 64, 1))
    _check_on_views("swiglu", [gate, _randn(2, 1, 3, 64).to(dtype)])


def test_adamw_step_refuses_a_found_inf_it_cannot_read():
    """A CPU flag, or several values, with CUDA parameters: the kernel would read a host pointer."""
    params, grads, m, v = _adam_state([(5, 3)], torch.float32, 2)
    if not EMULATED:  # emulated, the parameters are on the CPU too
        with pytest.raises(BackendError, match=f"'found_inf' must be one value on {DEV}"):
            ops.adamw_step(params, grads, m, v, lr=0.1, step=1, found_inf=torch.zeros(1), backend=BACKEND)
    with pytest.raises(ValueError, match="'found_inf' must have exactly one element"):  # (pyllm.ops, any backend)
        ops.adamw_step(params, grads, m, v, lr=0.1, step=1, found_inf=torch.zeros(2, device=DEV), backend=BACKEND)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab", [(1, 2), (13, 65), (7, 50257), (3, 65537), (5, 131072), (70001, 24)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(dtype, rows, vocab, reduction):
    logits = _randn(rows, vocab, scale=4)
    target = torch.randint(0, vocab, (rows,), device=DEV)
    target[::3] = -100
    _check("cross_entropy", [logits, target], dtype, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-4), (0.2, 1e-3)])
def test_cross_entropy_smoothing_and_z_loss(dtype, label_smoothing, z_loss):
    logits, target = _randn(2, 9, 1031, scale=3), torch.randint(0, 1031, (2, 9), device=DEV)
    _check("cross_entropy", [logits, target], dtype, label_smoothing=label_smoothing, z_loss=z_loss)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [1031, 32000])
def test_cross_entropy_masked_logits(dtype, vocab):
    """-inf logits (a masked or padded vocabulary), with every thread's first elements masked: the online
    max/sum then starts from two -inf, where exp(-inf - -inf) once made the whole row nan."""
    rows = 6
    logits = _randn(rows, vocab, scale=4)
    logits[:, : vocab // 2] = float("-inf")
    logits[torch.rand(rows, vocab, device=DEV) < 0.3] = float("-inf")
    target = torch.randint(vocab // 2, vocab, (rows,), device=DEV)
    logits[torch.arange(rows, device=DEV), target] = 1.0
    _check("cross_entropy", [logits, target], dtype, z_loss=1e-4)


@pytest.mark.parametrize("dtype", HALF)
def test_cross_entropy_strided_target(dtype):
    """A 1-D target view with a stride (one column of a (rows, 2) tensor): the backward once read it as
    contiguous (the forward had copied it), so every row but the first got another row's target."""
    rows, vocab = 37, 1000
    targets = torch.randint(0, vocab, (rows, 2), device=DEV)
    target = targets[:, 1]
    assert target.stride() == (2,)
    _check("cross_entropy", [_randn(rows, vocab, scale=3), target], dtype, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [9, 32000])
def test_cross_entropy_with_an_infinite_logit_is_the_references(dtype, vocab):
    """A +inf logit makes logsumexp +inf (merging the threads' sums, exp(inf - inf), once made it nan): rows
    with +inf at a non-target (+inf), at the target (nan), beside a -inf (+inf), in an ignored row (0)."""
    x = _randn(5, vocab, scale=3)
    target = torch.tensor([0, 1, 2, -100, 4], device=DEV)
    x[0, vocab - 2] = x[1, 1] = x[2, vocab // 2] = x[3, 5] = float("inf")
    x[2, 0] = float("-inf")
    x = x.to(dtype)
    loss = ops.cross_entropy(x, target, reduction="none", backend=BACKEND)
    want = ops.cross_entropy(x.float(), target, reduction="none", backend="torch")
    assert want[0] == want[2] == float("inf") and want[1].isnan() and want[3] == 0
    assert torch.equal(loss.isnan(), want.isnan()) and torch.equal(loss.isinf(), want.isinf())
    truth = ops.cross_entropy(x[4:].double(), target[4:], reduction="none", backend="torch")
    assert_close(loss[4:], truth, ops.cross_entropy(x[4:], target[4:], reduction="none", backend="torch"))


def test_cross_entropy_bad_target_gives_nan_not_a_crash():
    """The kernel flags a class index outside [0, V) with a nan row loss (checking it on the host would sync).
    pyllm.ops refuses such targets in CPU tensors (the emulator's) before any kernel: the kernel is called
    through the dispatcher here, as the public op calls it after its checks."""
    logits, target = _randn(3, 10), torch.tensor([1, 10, 2], device=DEV)
    loss = dispatch("cross_entropy", logits.device, BACKEND, logits, target, ignore_index=-100, label_smoothing=0.0,
                    z_loss=0.0, reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    if EMULATED:
        with pytest.raises(ValueError, match=r"'target' holds class indices outside \[0, 10\)"):
            ops.cross_entropy(logits, target, reduction="none", backend=BACKEND)
    else:
        assert torch.equal(ops.cross_entropy(logits, target, reduction="none", backend=BACKEND).isnan(), loss.isnan())


# ---- GEMM (csrc/cuda/gemm.cu): 128 x 128 tiles, K in steps of 32; N and K multiples of 8 (16-byte rows for
# cp.async), M anything. The shapes put tails in every dim: M = 1 and primes, N and K off the tile and step.


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M,N,K", [(1, 8, 8), (13, 24, 40), (127, 264, 72), (256, 512, 1024), (1000, 1032, 136),
                                   (997, 136, 8)])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_linear(dtype, M, N, K, activation):
    args = [_randn(M, K), _randn(N, K, scale=K ** -0.5), _randn(N)]
    _check("linear", args, dtype, activation=activation)
    with torch.no_grad():  # the inference path: bias and activation in the GEMM epilogue
        out = ops.linear(*(a.to(dtype) for a in args), activation=activation, backend=BACKEND)
        truth = reference.linear(*(a.double() for a in args), activation=activation)
        ref = reference.linear(*(a.to(dtype) for a in args), activation=activation)
    assert_close(out, truth, ref, "linear epilogue")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_linear_on_3d_input_and_frozen_operands(dtype, activation):
    """(B, T, K) activations as a model passes them; frozen operands with grad mode on take the epilogue
    path (the fused activation used to raise there: gemm_cuda's autograd setup refused it)."""
    x, w, b = _randn(2, 7, 72), _randn(40, 72, scale=72 ** -0.5), _randn(40)
    _check("linear", [x, w, b], dtype, activation=activation)
    out = ops.linear(x.to(dtype), w.to(dtype), b.to(dtype), activation=activation, backend="cuda")
    truth = reference.linear(x.double(), w.double(), b.double(), activation=activation)
    assert_close(out, truth, reference.linear(x.to(dtype), w.to(dtype), b.to(dtype), activation=activation),
                 "linear, frozen operands")


@gpu_only  # autocast on the CUDA device
def test_linear_under_autocast_of_the_other_half_dtype_returns_the_autocast_dtype(monkeypatch):
    """bf16 operands under fp16 autocast: F.linear casts them and returns fp16, so the kernel (which would
    return bf16) must leave such a call to the reference."""
    x, w = _randn(16, 64).to(torch.bfloat16), _randn(32, 64, scale=0.1).to(torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.float16):
        with pytest.raises(BackendError, match="bfloat16 operands under torch.float16 autocast"):
            ops.linear(x, w, backend="cuda")  # strict mode: the kernel refuses
        monkeypatch.setenv("PYLLM_STRICT_BACKEND", "0")
        out = ops.linear(x, w, backend="cuda")
        ref = reference.linear(x, w)
    assert out.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", HALF)
def test_linear_with_empty_inner_dim_gives_the_activated_bias(dtype):
    x, w, b = torch.empty(3, 0, device=DEV, dtype=dtype), torch.empty(16, 0, device=DEV, dtype=dtype), _randn(16)
    out = ops.linear(x, w, b.to(dtype), activation="gelu", backend="cuda")
    truth = reference.linear(x.double(), w.double(), b.double(), activation="gelu")
    assert_close(out, truth, reference.linear(x, w, b.to(dtype), activation="gelu"), "linear with K = 0")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("M,N,K", [(1, 8, 8), (130, 136, 264), (512, 512, 512), (997, 8, 16), (3, 136, 1032)])
def test_matmul(dtype, M, N, K):
    _check("matmul", [_randn(M, K), _randn(K, N, scale=K ** -0.5)], dtype)


def test_matmul_refuses_unaligned_inner_dim():
    a, b = _randn(4, 7).half(), _randn(7, 8).half()
    with pytest.raises(ops.BackendError, match="multiples of 8"):
        ops.matmul(a, b, backend=BACKEND)


def test_linear_refuses_output_dim_not_a_multiple_of_8():
    # the forward would run, but the backward's dx = dy @ W reads W (N, K) as a (K, N)-row operand
    with pytest.raises(ops.BackendError, match="multiples of 8"):
        ops.linear(_randn(4, 8).half(), _randn(12, 8).half(), backend="cuda")


# ---- attention (csrc/cuda/attention.cu): 64-query / 64-key tiles, D 64 or 128. Queries are the last T of S
# positions: T < S cases check the causal diagonal offset; S and T off the tile check the edge masks.


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("B,Hq,Hkv,T,S,D", [(1, 1, 1, 1, 1, 64), (2, 4, 4, 65, 65, 64), (1, 8, 2, 200, 200, 128),
                                            (2, 4, 1, 17, 130, 128), (1, 2, 2, 1024, 1024, 64),
                                            (1, 4, 2, 1, 67, 128), (1, 3, 1, 127, 131, 64), (2, 6, 3, 61, 61, 128),
                                            (1, 2, 1, 64, 1000, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention(dtype, B, Hq, Hkv, T, S, D, causal):
    q, k, v = _randn(B, Hq, T, D), _randn(B, Hkv, S, D), _randn(B, Hkv, S, D)
    _check("attention", [q, k, v], dtype, causal=causal)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_softmax_scale(dtype):
    q, k, v = _randn(1, 4, 40, 64), _randn(1, 2, 72, 64), _randn(1, 2, 72, 64)
    _check("attention", [q, k, v], dtype, causal=True, softmax_scale=0.3)


@pytest.mark.parametrize("dtype", HALF)
def test_attention_on_transposed_views(dtype):
    """q/k/v as a model makes them: (B, T, H, D) projections viewed as (B, H, T, D) (not contiguous)."""
    q, k, v = (_randn(2, 70, h, 128).transpose(1, 2) for h in (4, 2, 2))
    _check("attention", [q, k, v], dtype, causal=True)


def test_attention_with_no_queries_gives_zero_key_and_value_grads():
    q = torch.empty(1, 2, 0, 64, device=DEV, dtype=torch.half, requires_grad=True)
    k, v = (_randn(1, 1, 5, 64).half().requires_grad_() for _ in range(2))
    out = ops.attention(q, k, v, backend="cuda")
    (out.float().sum() + 0 * (k.float().sum() + v.float().sum())).backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_attention_and_gemm_custom_ops_under_torch_compile():
    """Traced with gradients, the ops' setup/backward see FakeTensors and must not read their data (they did)."""
    from pyllm.ops import cuda_backend as cb
    q, k, v = (_randn(1, h, 70, 64).half() for h in (4, 2, 2))
    x, w = _randn(9, 64).half(), _randn(24, 64, scale=0.125).half()

    def step(q, k, v, x, w):  # the custom ops themselves: the wrappers' checks are not what is tested here
        return (cb._attention(q, k, v, 0.125, True)[0].float().square().sum()
                + cb._gemm(x, w, None, True, 0).float().square().sum())

    results = []
    for fn in (step, torch.compile(step, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, x, w)]
        loss = fn(*leaves)
        loss.backward()
        results.append([loss] + [t.grad for t in leaves])
    for eager, compiled in zip(*results):  # not bitwise: dQ is summed with fp32 atomics in any order
        torch.testing.assert_close(compiled, eager, rtol=4e-3, atol=1e-3 * eager.abs().max().item())


def test_attention_opcheck_on_a_permuted_q():
    # the fake implementation must give the real outputs' (contiguous) strides for any input layout
    from pyllm.ops import cuda_backend as cb
    q = _randn(1, 70, 2, 64).half().transpose(1, 2)
    torch.library.opcheck(cb._attention.custom_op, (q.clone().requires_grad_(), q, q, 0.125, True))


@gpu_only
def test_memory_bound_ops_are_cross_checked_with_triton():
    """_check, test_adamw_step and test_unscale_and_check compare with Triton only where the triton
    backend is registered: fail loudly if it is not, instead of passing without the comparison."""
    ops_ = ("layer_norm", "rms_norm", "bias_gelu", "swiglu", "cross_entropy", "adamw_step", "unscale_and_check_")
    missing = [op for op in ops_ if not _triton_has(op)]
    assert not missing, f"no triton backend for {missing}: the CUDA-vs-Triton comparison would be skipped"


@gpu_only
def test_gemm_and_attention_are_cross_checked_with_triton():
    """_check compares with Triton only where the triton backend is registered: fail loudly if it is not."""
    missing = [op for op in ("matmul", "linear", "attention") if not _triton_has(op)]
    assert not missing, f"no triton backend for {missing}: the CUDA-vs-Triton comparison would be skipped"


def test_attention_with_doc_ids_is_refused():
    q = _randn(1, 2, 8, 64).half()
    with pytest.raises(ops.BackendError, match="doc_ids"):
        ops.attention(q, q, q, doc_ids=torch.zeros(1, 8, dtype=torch.long, device=DEV), backend=BACKEND)


CHUNK = 65536  # multi_tensor.cu: kChunk elements per block, 320 blocks and 36 tensors per launch table
# > 36 tensors, one tensor longer than a whole table (its chunks continue in the next table's slot 0),
# sizes at chunk boundaries, an empty tensor
# (emulated: 3 chunks instead of a table and a half, for speed; test_multi_tensor_table.py checks tables)
LONG = (3 if EMULATED else 320) * CHUNK + 1000
MT_SHAPES = [(1,), (7, 13), (LONG,), (CHUNK,), (CHUNK + 1,), (3, 5, 2), (0,)] + [(17,)] * 40


def _adam_state(shapes, dtype, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    make = lambda: [torch.randn(s, generator=gen, device=DEV) for s in shapes]  # noqa: E731
    params, grads, m = make(), make(), make()
    v = [t.abs() for t in make()]
    return [p.to(dtype) for p in params], [g.to(dtype) for g in grads], m, v


def _kernel_backends(op):
    return [BACKEND] + (["triton"] if _triton_has(op) else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_master", [False, True])
def test_adamw_step(dtype, with_master):
    hp = dict(lr=torch.tensor(1e-2, device=DEV), beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    backends = _kernel_backends("adamw_step")
    truth, ref = _adam_state(MT_SHAPES, torch.float64, 1), _adam_state(MT_SHAPES, dtype, 1)
    runs = {b: _adam_state(MT_SHAPES, dtype, 1) for b in backends}
    master = {b: [p.float() for p in truth[0]] if with_master else None for b in ["torch", *backends]}
    no_overflow = torch.zeros(1, device=DEV)  # a found_inf flag that is present but clear: the step runs
    for step in (1, 2, 3):
        ops.adamw_step(*truth, step=step, backend="torch", **hp)
        ops.adamw_step(*ref, step=step, master_params=master["torch"], backend="torch", **hp)
        for b in backends:
            ops.adamw_step(*runs[b], step=torch.tensor(step, device=DEV), master_params=master[b],
                           found_inf=no_overflow, backend=b, **hp)
    for i, name in ((0, "params"), (2, "exp_avgs"), (3, "exp_avg_sqs")):
        for j, (k, t, r) in enumerate(zip(runs[BACKEND][i], truth[i], ref[i])):
            assert_close(k, t, r, f"adamw {name}[{j}] ({dtype})")
            if "triton" in backends:  # CUDA vs Triton within the sum of both bounds
                other = runs["triton"][i][j]
                err = (k.double() - other.double()).abs().max().item() if k.numel() else 0.0
                assert err <= 2 * error_bound(t, r, k.dtype), f"adamw {name}[{j}]: cuda vs triton {err:.3e}"


def test_adamw_step_skips_on_found_inf():
    params, grads, m, v = _adam_state([(5, 3), (CHUNK + 3,)], torch.float32, 2)
    before = [t.clone() for t in (*params, *m, *v)]
    ops.adamw_step(params, grads, m, v, lr=0.1, step=1, found_inf=torch.ones(1, device=DEV), backend=BACKEND)
    for a, b in zip((*params, *m, *v), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
@pytest.mark.parametrize("backend", [BACKEND] + ([] if EMULATED else ["triton"]))
@pytest.mark.parametrize("inv_scale_on_device", [False, True])
def test_unscale_and_check(dtype, bad, backend, inv_scale_on_device):
    """Every element of every gradient scaled once (MT_SHAPES: table and chunk boundaries), found_inf set
    by an inf/nan anywhere, including past the first table; Triton must give the same bits."""
    if not _triton_has("unscale_and_check_") and backend == "triton":
        pytest.skip("no Triton unscale_and_check_ on this machine")
    gen = torch.Generator(device=DEV).manual_seed(3)
    grads = [torch.randn(s, generator=gen, device=DEV).to(dtype) for s in MT_SHAPES]
    if bad is not None:
        grads[2][-5] = bad  # the last chunk of the tensor that spans two tables
    expected = [(g.float() * 0.25).to(dtype) for g in grads]
    found = torch.zeros(1, device=DEV)
    inv_scale = torch.tensor(0.25, device=DEV) if inv_scale_on_device else 0.25
    ops.unscale_and_check_(grads, inv_scale, found, backend=backend)
    assert found.item() == (0.0 if bad is None else 1.0)
    for g, e in zip(grads, expected):
        assert torch.equal(g.isfinite(), e.isfinite())
        assert torch.equal(g[g.isfinite()], e[e.isfinite()])


@gpu_only
def test_non_cuda_tensor_is_refused():
    with pytest.raises(ops.BackendError, match="argument 'x'.*cpu"):
        ops.layer_norm(torch.randn(2, 4), torch.randn(4), backend=BACKEND)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensor_on_another_gpu_is_refused():
    """The kernels launch on the current device and stream: a tensor on another GPU was once passed on
    (an illegal address at best)."""
    x = torch.randn(4, 64, device="cuda:1")
    with torch.cuda.device(0), pytest.raises(ops.BackendError, match="current device is cuda:0"):
        ops.rms_norm(x, torch.ones(64, device="cuda:1"), backend=BACKEND)
    with torch.cuda.device(1):
        assert_close(ops.rms_norm(x, torch.ones(64, device="cuda:1"), backend=BACKEND),
                     reference.rms_norm(x.double(), torch.ones(64, device="cuda:1", dtype=torch.float64)),
                     reference.rms_norm(x, torch.ones(64, device="cuda:1")), "rms_norm on cuda:1")


def test_norm_width_beyond_int_indexing_is_refused():
    """norms.cu indexes a row with int: a width within one loop stride of 2^31 once passed the wrapper's
    check (<= 2^31 - 1) and overflowed i + 2048. Expanded tensors: nothing is allocated."""
    n = 2**31 - 1
    x, w = torch.zeros(1, 1, device=DEV).expand(1, n), torch.zeros(1, device=DEV).expand(n)
    for op in ("layer_norm", "rms_norm"):
        with pytest.raises(ops.BackendError, match="last dim of argument 'x'"):
            getattr(ops, op)(x, w, backend=BACKEND)


@pytest.mark.skipif(not EMULATED, reason="sets the emulated GPU's shared-memory limit")
def test_attention_beyond_the_gpus_shared_memory_is_a_one_line_error():
    """sm_86/89 allow 99 KB of shared memory per block: attention at D = 128 needs 110 KB (forward), D = 64
    fits. The opt-in's failure once went unnoticed and the launch failed with a bare "invalid argument"."""
    from pyllm.ops import cuda_backend as cb
    q64, q128 = _randn(1, 1, 16, 64).half(), _randn(1, 1, 16, 128).half()
    previous = cb._C.set_shared_memory_optin(99 * 1024)
    try:
        assert ops.attention(q64, q64, q64, backend=BACKEND).shape == q64.shape
        with pytest.raises(ValueError, match=r"attention_fwd \(head dim 128\) needs 112640 bytes of shared "
                                             r"memory per block; this GPU allows 101376"):
            ops.attention(q128, q128, q128, backend=BACKEND)
    finally:
        cb._C.set_shared_memory_optin(previous)


def test_fp32_attention_is_refused():
    q = _randn(1, 1, 4, 64)
    with pytest.raises(ops.BackendError, match="float16, bfloat16"):
        ops.attention(q, q, q, backend=BACKEND)


def _misaligned(*shape, dtype):
    """A contiguous view of ``shape`` whose address is one element past a 16-byte boundary."""
    t = _randn(math.prod(shape) + 1).to(dtype)[1:].view(shape)
    assert t.data_ptr() % 16
    return t


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_views_are_copied(dtype):
    """Every op with 128-bit loads on inputs one element past a 16-byte boundary, at a width that picks the
    vector path (64): the wrappers must copy them (a misaligned vector load is a fault on the GPU)."""
    m = functools.partial(_misaligned, dtype=dtype)
    _check_on_views("layer_norm", [m(8, 64), m(64), m(64)])
    _check_on_views("rms_norm", [m(8, 64), m(64)])
    _check_on_views("bias_gelu", [m(8, 64), m(64)])
    _check_on_views("swiglu", [m(8, 64), m(8, 64)])
    _check_on_views("cross_entropy", [m(8, 64), torch.randint(0, 64, (8,), device=DEV)])


def test_custom_ops_pass_opcheck():
    from pyllm.ops import cuda_backend as cb
    x = _randn(4, 64).half().requires_grad_()
    w, b = _randn(64).half().requires_grad_(), _randn(64).half()
    torch.library.opcheck(cb._norm.custom_op, (x, _randn(4, 64).half(), w, b, 1e-5, False))
    torch.library.opcheck(cb._bias_gelu.custom_op, (x, b, True))
    torch.library.opcheck(cb._swiglu.custom_op, (x, _randn(4, 64).half()))
    torch.library.opcheck(cb._cross_entropy.custom_op, (x, torch.tensor([0, 3, -100, 8], device=DEV), -100, 0.1, 0.0))
    torch.library.opcheck(cb._gemm.custom_op, (x, _randn(16, 64).half().requires_grad_(), None, True, 0))
    q = _randn(1, 2, 70, 64).half().requires_grad_()
    torch.library.opcheck(cb._attention.custom_op, (q, q.detach().clone(), q.detach().clone(), 0.125, True))
