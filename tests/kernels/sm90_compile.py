"""Compile every Triton kernel for Hopper (sm_90) without a GPU and report what the compiler made of it.

The interpreter (TRITON_INTERPRET=1, how CI runs kernels) is lenient: it never type-checks loop-carried
values, never lowers to PTX and knows nothing of registers or shared memory. This tool runs the real
compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with Triton's bundled ptxas) for a CUDA
compute-capability 9.0 target, with bf16 inputs and the GPU autotune configs, and prints per kernel
instance: the @triton.jit function compiled (module.name), registers per thread, local-memory bytes
(spills), shared memory, and whether the tensor-core path is Hopper's wgmma. ``test_sm90_compile.py``
runs it in a subprocess (the interpreter must be off when the kernels are imported).

Usage: python tests/kernels/sm90_compile.py [--all-configs] [--quick] [kernel-name substrings...]
(--quick: attention at head dim 128 only.)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernel imports: @triton.jit decides at import

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pyllm.kernels import (adamw, attention, cross_entropy, gelu, layernorm, loss_scale, matmul,  # noqa: E402
                           rope, softmax)

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
# upper-case names that are integers, not pointers
SIZES = {"M", "N", "T", "S", "HQ", "HKV", "HALF", "M_BUCKET", "T_BUCKET"}
FLOATS = {"eps", "qk_scale", "sm_scale", "label_smoothing", "z_loss", "inv_value", "lr_value", "step_value",
          "beta1", "beta2", "log2_beta1", "log2_beta2", "weight_decay", "growth_factor", "backoff_factor"}


def _signature(fn, constexprs: dict, pointers: dict, default_ptr: str) -> dict:
    """Argument types: upper-case names other than SIZES are pointers (``pointers`` overrides the
    default element type, or makes a name an integer with "i32"), FLOATS are fp32, the rest i32."""
    sig = {}
    for name, p in zip(fn.arg_names, fn.params):
        if p.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointers or (name[0].isupper() and name not in SIZES):
            sig[name] = pointers.get(name, default_ptr)
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def _compile(kernel, constexprs: dict, pointers=None, default_ptr="*bf16", num_warps=4, num_stages=3):
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs, pointers or {}, default_ptr), constexprs=constexprs)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages})
    return {"function": f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}", **_resource_usage(k.asm["cubin"]),
            "shared": k.metadata.shared, "wgmma": "wgmma" in k.asm["ptx"]}


def _resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory (spill) bytes, from Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    spill = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
    return {"regs": int(fields.get("REG", -1)), "spill_bytes": spill}


def _autotuned(kernel, constexprs, all_configs, **kw):
    """Compile with the first GPU config (or all); ``kernel.configs`` holds them (GPU list here)."""
    configs = kernel.configs if all_configs else kernel.configs[:1]
    for cfg in configs:
        yield f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", (
            lambda cfg=cfg: _compile(kernel, {**constexprs, **cfg.kwargs}, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, **kw))


def instances(all_configs: bool, quick: bool = False):
    """(name, config label, thunk returning the compile info) for a representative instance of every
    kernel (thunks, so that a name filter skips the compilation)."""
    f32 = "*fp32"
    yield "layernorm_fwd", "N=4096", lambda: _compile(layernorm._layernorm_fwd_kernel, dict(
        IS_RMS=False, HAS_RES=True, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=4096),
        pointers={"MEAN": f32, "RSTD": f32, "W": f32, "B": f32}, num_warps=8)
    yield "rmsnorm_bwd", "N=4096", lambda: _compile(layernorm._layernorm_bwd_kernel, dict(
        IS_RMS=True, HAS_DRES=True, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=4096),
        pointers={"MEAN": f32, "RSTD": f32, "DW_PART": f32, "DB_PART": f32}, num_warps=8)
    for name, k, ce in (("gelu_fwd", gelu._gelu_fwd_kernel, dict(HAS_BIAS=True, EXACT=False)),
                        ("gelu_bwd", gelu._gelu_bwd_kernel, dict(HAS_BIAS=True, EXACT=True)),
                        ("swiglu_fwd", gelu._swiglu_fwd_kernel, {}), ("swiglu_bwd", gelu._swiglu_bwd_kernel, {})):
        for label, info in _autotuned(k, ce, all_configs):
            yield name, label, info
    yield "rope", "D=128", lambda: _compile(rope._rope_fwd_kernel, dict(
        BACKWARD=False, BLOCK_T=1, BLOCK_H=32, BLOCK_D=64),
                                    pointers={"COS": f32, "SIN": f32})
    yield "softmax_fwd", "chunked", lambda: _compile(softmax._softmax_fwd_kernel, dict(SINGLE=False, BLOCK_N=4096),
                                                     num_warps=16)
    yield "softmax_bwd", "single", lambda: _compile(softmax._softmax_bwd_kernel, dict(SINGLE=True, BLOCK_N=8192),
                                                    num_warps=16)
    yield "cross_entropy_fwd", "V chunk 8192", lambda: _compile(cross_entropy._cross_entropy_fwd_kernel, dict(
        HAS_SMOOTHING=True, BLOCK_V=8192), pointers={"TGT": "*i64", "LOSS": f32, "LSE": f32, "V": "i32"}, num_warps=16)
    yield "cross_entropy_bwd", "V chunk 8192", lambda: _compile(cross_entropy._cross_entropy_bwd_kernel, dict(
        BLOCK_V=8192), pointers={"TGT": "*i64", "LSE": f32, "G": f32, "V": "i32"}, num_warps=16)
    yield "cross_entropy_scale_cast", "", lambda: _compile(cross_entropy._scale_cast_kernel, dict(BLOCK=4096),
                                                           pointers={"X": f32, "G": f32}, num_warps=8)
    yield "unscale", "chunk 65536", lambda: _compile(loss_scale._unscale_kernel, dict(
        INV_FROM_PTR=True, BLOCK=4096, CHUNK=65536), pointers={"TABLE": "*i64", "INV": f32, "FOUND": f32}, num_warps=8)
    yield "update_scale", "", lambda: _compile(loss_scale._update_scale_kernel, {},
                                       pointers={"SCALE": f32, "TRACKER": "*i32", "FOUND": f32}, num_warps=1)
    import triton.language as tl
    yield "adamw", "bf16 params, fp32 master", lambda: _compile(adamw._adamw_kernel, dict(
        P_DTYPE=tl.float32, G_DTYPE=tl.bfloat16, C_DTYPE=tl.bfloat16, HAS_COPY=True, LR_FROM_PTR=True,
        BC_FROM_PTR=True, HAS_FOUND=True, K=5, BLOCK=2048, CHUNK=65536),
        pointers={"TABLE": "*i64", "LR": f32, "BC": f32, "FOUND": f32}, num_warps=8)
    for label, info in _autotuned(matmul._matmul_kernel, dict(
            HAS_BIAS=True, ACTIVATION=2, STORE_PRE=False, ACCUMULATE=False, PRECISION=None), all_configs,
            pointers={"K": "i32"}):
        yield "matmul", label, info
    for label, info in _autotuned(matmul._matmul_acc_kernel, dict(
            HAS_BIAS=False, ACTIVATION=0, STORE_PRE=False, ACCUMULATE=True, PRECISION=None), all_configs,
            pointers={"C": f32, "K": "i32"}):
        yield "matmul_accumulate_fp32", label, info
    yield "attention_bwd_preprocess", "D=128", lambda: _compile(attention._attention_bwd_preprocess_kernel, dict(
        HQ=32, HEAD_DIM=128, BLOCK_M=64, BLOCK_D=128), pointers={"DELTA": f32})
    lse = {"LSE": f32, "DELTA": f32, "DOC": "*i64"}
    packed = dict(GROUP=4, CAUSAL=True, HAS_WINDOW=True, HAS_DOC=True, PRECISION=None, HEAD_DIM=128, BLOCK_D=128)
    for kernel, name, extra in ((attention._attention_fwd_kernel, "attention_fwd", {}),
                                (attention._attention_bwd_dkdv_kernel, "attention_dkdv", {"HKV": 8}),
                                (attention._attention_bwd_dq_kernel, "attention_dq", {})):
        yield f"{name} D=128 docs+window", "{'BLOCK_M': 64, 'BLOCK_N': 64} w4 s3", (
            lambda kernel=kernel, extra=extra: _compile(kernel, {"HQ": 32, **packed, **extra, "BLOCK_M": 64,
                                                                 "BLOCK_N": 64}, pointers=lse, num_warps=4))
    for D in ((128,) if quick else (128, 256)):
        common = dict(GROUP=4, CAUSAL=True, HAS_WINDOW=False, HAS_DOC=False, PRECISION=None, HEAD_DIM=D, BLOCK_D=D)
        for kernel, name, extra in ((attention._attention_fwd_kernel, "attention_fwd", {}),
                                    (attention._attention_bwd_dkdv_kernel, "attention_dkdv", {"HKV": 8}),
                                    (attention._attention_bwd_dq_kernel, "attention_dq", {})):
            configs = kernel.configs
            pruned = attention._prune_for_head_dim(configs, {}, BLOCK_D=D)
            for cfg in (pruned if all_configs else pruned[:1]):
                yield f"{name} D={D}", f"{cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}", (
                    lambda kernel=kernel, cfg=cfg, common=common, extra=extra: _compile(
                        kernel, {"HQ": 32, **common, **extra, **cfg.kwargs}, pointers=lse,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = [a for a in argv if not a.startswith("--")]  # kernel-name substrings to keep
    for name, label, thunk in instances("--all-configs" in argv, quick="--quick" in argv):
        if not only or any(o in name for o in only):
            print(json.dumps({"kernel": name, "config": label, **thunk()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
