"""The model: KV-cached decoding equals the uncached forward, packed documents equal separate runs,
the fused loss equals torch's cross-entropy of the logits, checkpointing changes nothing, configs
reject bad fields with a message that says what to change."""

import pytest
import torch
import torch.nn.functional as F

from pyllm.model import KVCache, ModelConfig, Transformer, preset

FAMILIES = {
    "gpt2": dict(name="tiny", n_layer=2, d_model=32, n_head=4, vocab_size=64, max_seq_len=32),
    "llama": dict(name="tiny_llama", n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=64, max_seq_len=32),
}


def small_model(family, **overrides):
    kw = {**FAMILIES[family], **overrides}
    return Transformer(preset(kw.pop("name"), **kw)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_matches_uncached_forward(family):
    model = small_model(family)
    idx = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        full = model(idx)  # (2, 11, V)
        cache = KVCache.empty(model.cfg, 2, 16, "cpu", torch.float32)
        pieces = [model(idx[:, :5], cache=cache), model(idx[:, 5:7], cache=cache)]  # prefill, then a chunk
        pieces += [model(idx[:, t:t + 1], cache=cache) for t in range(7, 11)]  # one token at a time
    assert cache.length == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_equal_separate_runs(family):
    model = small_model(family)
    a, b = torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 5))
    packed = torch.cat([a, b], dim=1)
    doc_ids = torch.tensor([[0] * 4 + [1] * 5])
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # each document restarts at 0
    with torch.no_grad():
        out = model(packed, positions=positions, doc_ids=doc_ids)
        torch.testing.assert_close(out[:, :4], model(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[:, 4:], model(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fused", [True, False])
def test_loss_is_cross_entropy_of_logits(family, fused):
    model = small_model(family, fused_loss=fused)
    idx, targets = torch.randint(0, 64, (2, 7)), torch.randint(0, 64, (2, 7))
    targets[1, :3] = -100
    logits = model(idx)
    expected = F.cross_entropy(logits.reshape(-1, 64), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model.loss(idx, targets), expected, rtol=1e-5, atol=1e-6)
    per_token = model.loss(idx, targets, reduction="none")
    assert per_token.shape == (2, 7) and torch.all(per_token[1, :3] == 0)


def test_hidden_feeds_the_head():
    model = small_model("llama")
    idx = torch.randint(0, 64, (1, 6))
    h = model.hidden(idx)
    assert h.shape == (1, 6, 32)
    torch.testing.assert_close(model(idx), h @ model.head_weight.T)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", [None, "torch", "cpu"])
def test_activation_checkpointing_gives_same_loss_and_grads(family, backend):
    # with a backend named by the config, the recompute in the backward (outside the forward's use_backend)
    # ran the default backend's kernels: "different number of tensors saved" (CheckpointError) in fp32
    torch.manual_seed(0)
    plain = small_model(family, backend=backend).train()
    ckpt = small_model(family, activation_checkpointing=True, backend=backend).train()
    ckpt.load_state_dict(plain.state_dict())
    idx, targets = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    losses = []
    for m in (plain, ckpt):
        loss = m.loss(idx, targets)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_dropout_only_in_training():
    model = small_model("gpt2", dropout=0.5)
    idx = torch.randint(0, 64, (1, 8))
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_tied_and_untied_heads():
    tied = small_model("gpt2")
    assert tied.head_weight is tied.wte.weight and tied.lm_head is None
    untied = small_model("llama")
    assert untied.head_weight is untied.lm_head.weight
    # num_params counts each parameter once; non_embedding drops the token and position tables
    assert tied.num_params() == sum(p.numel() for p in tied.parameters())
    assert tied.num_params(non_embedding=True) == tied.num_params() - 64 * 32 - 32 * 32


def test_sequence_longer_than_context_is_refused():
    model = small_model("gpt2")
    with pytest.raises(ValueError, match="sequence of 33 tokens exceeds the model's context \\(32\\)"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_model_runs_in_float64():
    model = small_model("llama").double()
    assert model(torch.randint(0, 64, (1, 5))).dtype == torch.float64


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 16}
BAD_CONFIGS = {
    "d_model": (dict(d_model=100, n_head=12), "d_model=100 must be a positive multiple of n_head=12"),
    "n_kv_head": (dict(n_head=4, d_model=64, n_kv_head=3), "n_head=4 must be a multiple of n_kv_head=3"),
    "norm": (dict(norm="batchnorm"), "norm='batchnorm': use 'layernorm' or 'rmsnorm'"),
    "mlp": (dict(mlp="relu"), "mlp='relu': use 'gelu' or 'swiglu'"),
    "pos": (dict(pos="alibi"), "pos='alibi': use 'learned' or 'rope'"),
    "rope": (dict(pos="rope", n_head=4, d_model=20), "rope needs an even head dim, got 5"),
    "dropout": (dict(dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
    "vocab": (dict(vocab_size=0), "vocab_size=0 must be positive"),
    "backend": (dict(backend="gpu"), "unknown backend 'gpu'; valid backends are"),
    "rope_scaling": (dict(pos="rope", rope_scaling={"factor": 8.0}),
                     "rope_scaling=.* needs pos='rope' and exactly the keys"),
    # each value of rope_scaling: a factor of 0 gave non-finite logits, a string a TypeError at the first forward
    "rope_scaling factor 0": (dict(pos="rope", rope_scaling={**LLAMA31, "factor": 0.0}),
                              r"rope_scaling\['factor'\]=0.0 must be positive"),
    "rope_scaling factor < 0": (dict(pos="rope", rope_scaling={**LLAMA31, "factor": -2.0}),
                                r"rope_scaling\['factor'\]=-2.0 must be positive"),
    "rope_scaling factor inf": (dict(pos="rope", rope_scaling={**LLAMA31, "factor": float("inf")}),
                                r"rope_scaling\['factor'\]=inf must be a finite number"),
    "rope_scaling factor str": (dict(pos="rope", rope_scaling={**LLAMA31, "factor": "8"}),
                                r"rope_scaling\['factor'\]='8' must be a number"),
    "rope_scaling low 0": (dict(pos="rope", rope_scaling={**LLAMA31, "low_freq_factor": 0}),
                           r"rope_scaling\['low_freq_factor'\]=0 must be positive"),
    "rope_scaling context < 0": (dict(pos="rope", rope_scaling={**LLAMA31, "original_max_seq_len": -16}),
                                 r"rope_scaling\['original_max_seq_len'\]=-16 must be positive"),
    "rope_scaling context float": (dict(pos="rope", rope_scaling={**LLAMA31, "original_max_seq_len": 16.5}),
                                   r"rope_scaling\['original_max_seq_len'\]=16.5 must be an integer"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_config_validation_messages(case):
    fields, message = BAD_CONFIGS[case]
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)


def test_config_defaults_and_dict_round_trip():
    cfg = preset("tiny_llama")
    assert cfg.n_kv_head == 2 and cfg.head_dim == 32 and cfg.d_ff == 64 * -(-(8 * 128 // 3) // 64)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert preset("gpt2_small").d_ff == 4 * 768
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_layers'\]"):
        ModelConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="unknown model preset 'gpt5'; valid presets: gpt2_small"):
        preset("gpt5")


def test_cache_longer_than_learned_positions_is_refused():
    model = small_model("gpt2")
    cache = KVCache.empty(model.cfg, 1, 40, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="sequence of 33 tokens exceeds the model's context \\(32\\)"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_of_another_batch_is_refused(family):
    # was torch's "expanded size of the tensor" RuntimeError from the cache write
    model = small_model(family)
    cache = KVCache.empty(model.cfg, 3, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match=r"KV cache of shape \(2, 3, .*\) does not fit a batch of 2 rows"):
        model(torch.zeros(2, 4, dtype=torch.long), cache=cache)
    assert cache.length == 0


def test_learned_positions_beyond_the_table_are_refused():
    # explicit positions past max_seq_len=32 (or negative) were an IndexError from the embedding lookup
    model = small_model("gpt2")
    idx = torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"positions 30..32 are outside the learned position table \(0..31"):
        model(idx, positions=torch.tensor([[30, 31], [31, 32]]))
    with pytest.raises(ValueError, match=r"positions -1..0 are outside"):
        model(idx, positions=torch.tensor([[0, -1]] * 2))
    assert small_model("llama")(idx, positions=torch.tensor([[30, 31]] * 2)).shape == (2, 2, 64)  # RoPE: any


def test_cpu_bf16_autocast_keeps_attention_in_fp32(monkeypatch):
    """Under CPU bf16 autocast the matmuls run in bf16, and the reference attention computes SDPA in fp32 with
    autocast off (PyTorch's bf16 CPU attention backward is several times slower than its fp32 one); the
    model hands it the bf16 head views as they are."""
    import torch.nn.functional as F

    from pyllm import ops

    seen, sdpa = [], []
    real, real_sdpa = ops.attention, F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real(q, k, v, **kw)

    def sdpa_spy(q, k, v, **kw):
        sdpa.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    monkeypatch.setattr(ops, "attention", spy)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa_spy)
    torch.manual_seed(0)
    model = Transformer(preset("tiny", vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16,
                               backend="torch"))
    idx = torch.randint(0, 64, (2, 16))
    ref = model.loss(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(idx, idx)
        logits = model(idx)
    assert seen[-1] == (torch.bfloat16,) * 3 and len(seen) == 3 * 2
    assert sdpa[-1] == (torch.float32, torch.float32, torch.float32, False) and len(sdpa) == 3 * 2
    assert logits.dtype == torch.bfloat16  # the head matmul still ran in bf16
    assert abs(low.item() - ref.item()) / ref.item() < 2e-2  # bf16 unit roundoff 3.9e-3, a few layers deep


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_mlp_activation_stays_in_the_autocast_dtype(monkeypatch, backend):
    """fc's float32 bias joins the bf16 GEMM output in bf16, as nn.Linear adds its bias under autocast, so the
    (tokens, d_ff) GELU activation is bf16 rather than promoted to float32; without autocast all is float32."""
    from pyllm import ops

    seen, real = [], ops.bias_gelu

    def spy(x, bias=None, **kw):
        y = real(x, bias, **kw)
        seen.append((x.dtype, bias.dtype, y.dtype))
        return y

    monkeypatch.setattr(ops, "bias_gelu", spy)
    model = small_model("gpt2", backend=backend)
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.loss(idx, idx).backward()
    assert seen == [(torch.bfloat16,) * 3] * 2
    assert model.blocks[0].mlp.fc.bias.grad.dtype == torch.float32  # the parameter's gradient stays float32
    seen.clear()
    model.loss(idx, idx)
    assert seen == [(torch.float32,) * 3] * 2
