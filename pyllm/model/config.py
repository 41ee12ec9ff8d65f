"""Model configuration: one typed dataclass for both families (GPT-2 style and Llama style), plus presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyllm.ops.registry import check_backend_name
from pyllm.typecheck import check_fields, type_problem


@dataclass
class ModelConfig:
    """A decoder-only transformer. Defaults are GPT-2 small (124M)."""

    vocab_size: int = 50257
    """Number of token ids the embedding and the output head cover."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Number of query heads."""
    n_kv_head: int | None = None
    """Key/value heads for grouped-query attention; None means n_head (multi-head), 1 is multi-query."""
    d_model: int = 768
    """Width of the residual stream; must be a multiple of n_head."""
    d_ff: int | None = None
    """Hidden width of the MLP; None: 4 * d_model for "gelu", 8/3 * d_model rounded up to 64 for "swiglu"."""
    max_seq_len: int = 1024
    """Longest sequence (learned positions table size; KV cache default)."""
    norm: str = "layernorm"
    """"layernorm" (GPT-2) or "rmsnorm" (Llama)."""
    mlp: str = "gelu"
    """"gelu" (GELU MLP, GPT-2) or "swiglu" (gated MLP, Llama)."""
    gelu_approximate: str = "tanh"
    """GELU form for mlp="gelu": "tanh" (GPT-2's gelu_new) or "none" (exact)."""
    pos: str = "learned"
    """Positions: "learned" (absolute table, GPT-2) or "rope" (rotary, Llama)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: dict | None = None
    """Llama 3 RoPE frequency scaling (Llama-3.1/3.2 checkpoints): {"factor", "low_freq_factor",
    "high_freq_factor", "original_max_seq_len"}; None is plain RoPE."""
    bias: bool = True
    """Biases in linear layers and LayerNorm (GPT-2: True, Llama: False)."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers."""
    dropout: float = 0.0
    """Dropout on embeddings and on each sublayer's output (training only)."""
    init_std: float = 0.02
    """Std of the normal initialisation; output projections are scaled by 1/sqrt(2 * n_layer) (GPT-2)."""
    backend: str | None = None
    """Op backend for this model ("torch", "triton", "cuda", "cpu", "auto"); None defers to the context
    and PYLLM_BACKEND (see pyllm.ops.registry)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of storing them (training only)."""
    fused_loss: bool = True
    """Compute the training loss with linear_cross_entropy (no full logits in memory)."""

    def __post_init__(self):
        check_fields(self)  # e.g. n_layer "2" or bias "false" from a hand-edited config.json
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * -(-(8 * self.d_model // 3) // 64)
        if self.n_head <= 0:  # (head_dim, in the messages below, divides by it)
            raise ValueError(f"ModelConfig: n_head={self.n_head} must be positive")
        checks = [
            (self.vocab_size > 0, f"vocab_size={self.vocab_size} must be positive"),
            (self.n_layer > 0, f"n_layer={self.n_layer} must be positive"),
            (self.d_model > 0 and self.d_model % self.n_head == 0,
             f"d_model={self.d_model} must be a positive multiple of n_head={self.n_head}"),
            (self.d_ff >= 1, f"d_ff={self.d_ff} must be >= 1"),
            (self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'"),
            (self.mlp in ("gelu", "swiglu"), f"mlp={self.mlp!r}: use 'gelu' or 'swiglu'"),
            (self.pos in ("learned", "rope"), f"pos={self.pos!r}: use 'learned' or 'rope'"),
            (self.gelu_approximate in ("tanh", "none"),
             f"gelu_approximate={self.gelu_approximate!r}: use 'tanh' or 'none'"),
            (self.pos != "rope" or self.head_dim % 2 == 0, f"rope needs an even head dim, got {self.head_dim}"),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"),
            (self.max_seq_len > 0, f"max_seq_len={self.max_seq_len} must be positive"),
            (self.rope_theta > 0, f"rope_theta={self.rope_theta} must be positive"),
            (self.norm_eps > 0, f"norm_eps={self.norm_eps} must be positive"),
            (self.init_std >= 0, f"init_std={self.init_std} must be >= 0"),
        ]
        if self.rope_scaling is not None:
            checks.append(_rope_scaling_check(self.rope_scaling, self.pos))
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")
        if self.backend is not None:
            check_backend_name(self.backend, allow_auto=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


_ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len")


def _rope_scaling_check(scaling: dict, pos: str) -> tuple[bool, str]:
    """(ok, message) for ``ModelConfig.rope_scaling``: the keys first, then each value, which divides or
    multiplies RoPE's frequencies (a factor of 0 gives non-finite logits, a string "8" a TypeError only at the
    first forward)."""
    if set(scaling) != set(_ROPE_SCALING_KEYS) or pos != "rope":
        return False, f"rope_scaling={scaling} needs pos='rope' and exactly the keys {sorted(_ROPE_SCALING_KEYS)}"
    for key in _ROPE_SCALING_KEYS:
        value = scaling[key]
        want = type_problem(value, int if key == "original_max_seq_len" else float)
        if want is not None or value <= 0:
            return False, f"rope_scaling[{key!r}]={value!r} must be {want or 'positive'}"
    return (scaling["high_freq_factor"] > scaling["low_freq_factor"],
            f"rope_scaling={scaling} needs high_freq_factor > low_freq_factor")


# ------------------------------------------------------------------------------------------- presets


def gpt2_small(**overrides) -> ModelConfig:
    """GPT-2 124M."""
    return ModelConfig(**overrides)


def gpt2_medium(**overrides) -> ModelConfig:
    """GPT-2 350M."""
    return ModelConfig(**{"n_layer": 24, "n_head": 16, "d_model": 1024, **overrides})


def llama(**overrides) -> ModelConfig:
    """Llama-style defaults (RMSNorm, SwiGLU, RoPE, no biases, untied); width set by overrides."""
    base = dict(norm="rmsnorm", mlp="swiglu", pos="rope", bias=False, tie_embeddings=False, norm_eps=1e-5,
                rope_theta=500000.0, vocab_size=128256, max_seq_len=8192)
    return ModelConfig(**{**base, **overrides})


def llama_1b(**overrides) -> ModelConfig:
    """Llama-3.2-1B shape: 16 layers, width 2048, 32 query / 8 kv heads, MLP 8192."""
    return llama(**{"n_layer": 16, "n_head": 32, "n_kv_head": 8, "d_model": 2048, "d_ff": 8192,
                    "tie_embeddings": True, **overrides})


def llama_8b(**overrides) -> ModelConfig:
    """Llama-3-8B shape: 32 layers, width 4096, 32 query / 8 kv heads, MLP 14336."""
    return llama(**{"n_layer": 32, "n_head": 32, "n_kv_head": 8, "d_model": 4096, "d_ff": 14336, **overrides})


def tiny(**overrides) -> ModelConfig:
    """A CPU-sized GPT (nanoGPT's CPU config: 4 layers, 4 heads, width 128) for tests and smoke runs."""
    return ModelConfig(**{"vocab_size": 256, "n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 256,
                          **overrides})


def tiny_llama(**overrides) -> ModelConfig:
    """A CPU-sized Llama-style model with grouped-query attention, for tests and smoke runs."""
    return llama(**{"vocab_size": 256, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "d_model": 128,
                    "max_seq_len": 256, "rope_theta": 10000.0, **overrides})


PRESETS = {f.__name__: f for f in (gpt2_small, gpt2_medium, llama_1b, llama_8b, tiny, tiny_llama)}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
