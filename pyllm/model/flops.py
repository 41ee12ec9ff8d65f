"""Parameter and FLOP counts from a config, and model FLOPs utilisation (MFU).

Training FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B), as nanoGPT's
``estimate_mfu`` does: 6 N for the weight matmuls (2 N forward, 4 N backward) plus 12 L T d for
attention's QK^T and AV (counted without the causal halving, as PaLM does), where N counts every
parameter but the embedding lookups: the block weights and the output head (tied or not), and, as
nanoGPT's N does, the norm weights and biases, which take no part in a matmul (0.1% of GPT-2 small's
N). L is the layer count, T the sequence length and d the attention width (n_head x head_dim =
d_model). MFU is achieved model FLOP/s over the hardware's peak; recomputation (activation
checkpointing) is not counted, by definition of MFU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ModelConfig

# Dense (no structured sparsity) peak FLOP/s from the vendors' data sheets. "bf16"/"fp16" are tensor-core
# rates with fp32 accumulation, "tf32" tensor-core TF32, "fp32" the non-tensor-core FMA rate.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "tf32": 418e12, "fp32": 60e12},  # sheet: sparse 1671/835, halved
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "V100 SXM2": {"fp16": 125e12, "fp32": 15.7e12},
}
# Whole words of torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"), most
# specific first.
_NAME_PATTERNS = (("H100 PCIe", "H100 PCIe"), ("H100 NVL", "H100 NVL"), ("H100", "H100 SXM"), ("H200", "H200"),
                  ("A100", "A100"), ("L4", "L4"), ("4090", "RTX 4090"), ("V100", "V100 SXM2"))


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a config, by role."""

    embedding: int
    """Token embedding table (and the learned position table)."""
    blocks: int
    """All transformer blocks (attention, MLP, norms, biases)."""
    head: int
    """The output head's own weights (0 when tied to the token embedding) plus the final norm."""
    total: int
    """Every distinct parameter (what ``Transformer.num_params()`` returns)."""
    matmul: int
    """N of the 6 N FLOPs per token: blocks + final norm + the head matrix (tied or not); norm weights and biases
    included, as in nanoGPT."""


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count parameters from the config alone (no model is built)."""
    d, f, D = cfg.d_model, cfg.d_ff, cfg.head_dim
    norm = d * (2 if cfg.bias and cfg.norm == "layernorm" else 1)  # weight (+ bias)
    qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * D
    attn = d * qkv_out + d * d + ((qkv_out + d) if cfg.bias else 0)
    if cfg.mlp == "gelu":
        mlp = 2 * d * f + ((f + d) if cfg.bias else 0)
    else:  # swiglu: fc has no bias (see MLP), proj follows cfg.bias
        mlp = 3 * d * f + (d if cfg.bias else 0)
    blocks = cfg.n_layer * (2 * norm + attn + mlp)
    embedding = cfg.vocab_size * d + (cfg.max_seq_len * d if cfg.pos == "learned" else 0)
    head = norm + (0 if cfg.tie_embeddings else cfg.vocab_size * d)
    return ParamCounts(embedding=embedding, blocks=blocks, head=head, total=embedding + blocks + head,
                       matmul=blocks + norm + cfg.vocab_size * d)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """FLOPs per token at sequence length ``seq_len``: 6 N + 12 L T d for a training step (forward +
    backward), a third of that (2 N + 4 L T d) for a forward pass alone."""
    forward = 2 * param_counts(cfg).matmul + 4 * cfg.n_layer * seq_len * cfg.n_head * cfg.head_dim
    return 3 * forward if training else forward


def mfu(tokens_per_s: float, cfg: ModelConfig, seq_len: int, peak_flops: float) -> float:
    """Model FLOPs utilisation of a training run: tokens/s x training FLOPs per token / peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"mfu: peak_flops={peak_flops} must be positive")
    return tokens_per_s * flops_per_token(cfg, seq_len) / peak_flops


def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Peak dense FLOP/s of a GPU named as ``torch.cuda.get_device_name()`` does, in ``dtype``
    ("bf16", "fp16", "tf32", "fp32"); None when the GPU or dtype is not in ``PEAK_FLOPS``."""
    for pattern, key in _NAME_PATTERNS:
        if re.search(rf"\b{pattern}\b", device_name):
            return PEAK_FLOPS[key].get(dtype)
    return None


def cpu_peak_flops(cores: int, ghz: float, flops_per_cycle: int) -> float:
    """Peak FLOP/s of a CPU: cores x clock x FLOPs per cycle per core. ``flops_per_cycle`` for fp32 is
    32 with AVX2 and two FMA units (2 units x 8 lanes x 2 FLOPs per FMA), 64 with AVX-512."""
    if cores <= 0 or ghz <= 0 or flops_per_cycle <= 0:
        raise ValueError("cpu_peak_flops: cores, ghz and flops_per_cycle must be positive")
    return cores * ghz * 1e9 * flops_per_cycle
