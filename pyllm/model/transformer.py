"""A decoder-only transformer built only from ``pyllm.ops``.

The residual stream uses the fused "add + norm" form: each norm op receives the sublayer output
``delta`` and the running ``residual`` and returns (norm(residual + delta), residual + delta), so the
add never makes a separate pass over memory. The computation equals the textbook pre-norm block
x = x + attn(norm(x)); x = x + mlp(norm(x)).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from pyllm import ops

from .config import ModelConfig


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (n_layer, B, Hkv, max_len, D) each."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def rope_frequencies(cfg: ModelConfig, device) -> torch.Tensor:
    """RoPE's rotation frequency per pair of head dims (D/2,), fp32: theta^(-2i/D) (Su et al. 2021).

    With ``cfg.rope_scaling`` (Llama 3.1): wavelengths longer than original_max_seq_len /
    low_freq_factor are stretched by ``factor``, those shorter than original_max_seq_len /
    high_freq_factor are kept, and the band between is interpolated linearly in
    original_max_seq_len / wavelength.
    """
    D = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D)
    if cfg.rope_scaling is None:
        return inv_freq
    s = cfg.rope_scaling
    context_over_wavelen = s["original_max_seq_len"] * inv_freq / (2 * math.pi)
    # 0 where the wavelength is long (fully stretched) ... 1 where it is short (kept)
    keep = ((context_over_wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
    return (1 - keep) * inv_freq / s["factor"] + keep * inv_freq


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.bias and cfg.norm == "layernorm" else None

    def forward(self, x, residual=None):
        """Returns (norm(x + residual), x + residual); with no residual yet, (norm(x), x)."""
        if self.kind == "layernorm":
            out = ops.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)
        else:
            out = ops.rms_norm(x, self.weight, eps=self.eps, residual=residual)
        return out if residual is not None else (out, x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        qkv_out = (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, qkv_out, bias=cfg.bias)  # rows: [q heads | k heads | v heads]
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x, rope_cs, doc_ids, cache: KVCache | None):
        cfg = self.cfg
        B, T, _ = x.shape
        qkv = ops.linear(x, self.qkv.weight, self.qkv.bias)  # (B, T, (Hq + 2 Hkv) D)
        qkv = qkv.view(B, T, cfg.n_head + 2 * cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k, v = qkv.split([cfg.n_head, cfg.n_kv_head, cfg.n_kv_head], dim=1)  # (B, H, T, D)
        if rope_cs is not None:
            q, k = ops.rope(q, k, *rope_cs)
        if cache is not None:
            start = cache.length
            cache.k[self.layer, :, :, start:start + T] = k
            cache.v[self.layer, :, :, start:start + T] = v
            # (B, Hkv, start + T, D); cast back in case k/v came out of autocast in another dtype
            k = cache.k[self.layer, :, :, :start + T].to(q.dtype)
            v = cache.v[self.layer, :, :, :start + T].to(q.dtype)
        # q, k, v are head views of qkv: backends read them through their strides (the cpu one also
        # writes the gradient of qkv in one piece when they are exactly these views)
        y = ops.attention(q, k, v, causal=True, doc_ids=doc_ids)
        y = y.transpose(1, 2).reshape(B, T, cfg.d_model)  # (B, T, Hq D)
        return ops.linear(y, self.proj.weight, self.proj.bias)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.mlp == "gelu":
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        else:
            self.fc = nn.Linear(cfg.d_model, 2 * cfg.d_ff, bias=False)  # rows: [gate | up]
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x):
        if self.cfg.mlp == "gelu":
            h, bias = ops.linear(x, self.fc.weight), self.fc.bias
            # fc's bias in the GEMM output's dtype, as nn.Linear adds it under autocast: a float32 bias on bf16
            # activations would promote the whole (tokens, d_ff) activation to float32
            if bias is not None and bias.dtype != h.dtype:
                bias = bias.to(h.dtype)
            h = ops.bias_gelu(h, bias, approximate=self.cfg.gelu_approximate)
        else:
            gate, up = ops.linear(x, self.fc.weight).chunk(2, dim=-1)
            h = ops.swiglu(gate, up)
        return ops.linear(h, self.proj.weight, self.proj.bias)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.norm1, self.attn = Norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = Norm(cfg), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, delta, residual, rope_cs, doc_ids, cache):
        h, residual = self.norm1(delta, residual)
        delta = self.dropout(self.attn(h, rope_cs, doc_ids, cache))
        h, residual = self.norm2(delta, residual)
        delta = self.dropout(self.mlp(h))
        return delta, residual


def _on_backend(backend: str, block, *args):
    """``block(*args)`` with its ops on ``backend``: what activation checkpointing runs, so that the recompute
    in the backward (outside the forward's ``use_backend``) runs the same kernels as the forward did."""
    with ops.use_backend(backend):
        return block(*args)


class Transformer(nn.Module):
    """GPT-2 / Llama style decoder. ``forward(idx)`` gives logits (B, T, V); ``loss(idx, targets)`` the
    mean next-token loss; ``hidden(idx)`` the final normed hidden states (B, T, d) for heads (value,
    reward) built on top."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" in name:
                nn.init.ones_(p)
            elif name.endswith("proj.weight"):  # residual-stream outputs, GPT-2's 1/sqrt(2L) scaling
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wte.weight.numel() + (self.wpe.weight.numel() if self.wpe is not None else 0)
        return n

    def _backend(self):
        """The op backend named by the config, for the ops this model runs."""
        return ops.use_backend(self.cfg.backend) if self.cfg.backend else contextlib.nullcontext()

    def _rope(self, positions):
        # Frequencies are recomputed in fp32 on every call rather than kept as a buffer, which
        # model.to(bfloat16) would round (and so rotate every position by the wrong angle).
        freqs = positions[..., None].float() * rope_frequencies(self.cfg, positions.device)  # (B, T, D/2)
        return freqs.cos(), freqs.sin()

    def hidden(self, idx, positions=None, doc_ids=None, cache: KVCache | None = None):
        """Final normed hidden states (B, T, d_model). ``positions`` (B, T) default to consecutive
        positions after the cache; ``doc_ids`` (B, S) per key position (see ops.attention)."""
        cfg = self.cfg
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else cfg.max_seq_len
        if positions is None and self.wpe is not None:  # default positions must fit the learned table
            limit = min(limit, cfg.max_seq_len)
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens exceeds the model's context ({limit})")
        if cache is not None and cache.k.shape != (cfg.n_layer, B, cfg.n_kv_head, cache.max_len, cfg.head_dim):
            raise ValueError(f"KV cache of shape {tuple(cache.k.shape)} does not fit a batch of {B} rows of this "
                             f"model: it needs ({cfg.n_layer}, {B}, {cfg.n_kv_head}, max_len, {cfg.head_dim})")
        if positions is None:
            positions = torch.arange(start, start + T, device=idx.device).expand(B, T)
        x = self.wte(idx)
        if self.wpe is not None:
            try:
                x = x + self.wpe(positions)
            except IndexError:  # (on CPU; a GPU's lookup fails its own device assert: checking the values up
                # front would cost a device sync on every step)
                raise ValueError(f"positions {int(positions.min())}..{int(positions.max())} are outside the "
                                 f"learned position table (0..{cfg.max_seq_len - 1}, max_seq_len)") from None
        rope_cs = self._rope(positions) if cfg.pos == "rope" else None
        delta, residual = self.dropout(x), None
        with self._backend():
            # a checkpointed block is recomputed during the backward, outside this context: it names the backend
            backend = ops.requested_backend()
            for block in self.blocks:
                if cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                    delta, residual = checkpoint(_on_backend, backend, block, delta, residual, rope_cs, doc_ids, cache,
                                                 use_reentrant=False)
                else:
                    delta, residual = block(delta, residual, rope_cs, doc_ids, cache)
            h, _ = self.norm_f(delta, residual)
        if cache is not None:
            cache.length += T
        return h

    def forward(self, idx, positions=None, doc_ids=None, cache: KVCache | None = None):
        """Logits (B, T, vocab)."""
        h = self.hidden(idx, positions, doc_ids, cache)
        with self._backend():
            return ops.linear(h, self.head_weight)

    def loss(self, idx, targets, *, positions=None, doc_ids=None, ignore_index=-100, reduction="mean"):
        """Next-token cross-entropy of ``targets`` (B, T) (already shifted; ignore_index rows skipped)."""
        h = self.hidden(idx, positions, doc_ids)
        with self._backend():
            if self.cfg.fused_loss:
                return ops.linear_cross_entropy(h, self.head_weight, targets, ignore_index=ignore_index,
                                                reduction=reduction)
            return ops.cross_entropy(ops.linear(h, self.head_weight), targets, ignore_index=ignore_index,
                                     reduction=reduction)
