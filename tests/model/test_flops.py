"""Parameter and FLOP counts against numbers worked out by hand (and against the built model)."""

import pytest

from pyllm.model import Transformer, preset
from pyllm.model.flops import cpu_peak_flops, flops_per_token, mfu, param_counts, peak_flops


@pytest.mark.parametrize("name, overrides", [
    ("tiny", {}), ("tiny", {"tie_embeddings": False, "bias": False}), ("tiny_llama", {}),
    ("tiny_llama", {"tie_embeddings": True, "n_kv_head": 1, "bias": True}),
    ("tiny", {"mlp": "swiglu", "norm": "rmsnorm", "pos": "rope", "d_ff": 96}),
])
def test_counts_match_the_built_model(name, overrides):
    cfg = preset(name, n_layer=2, **overrides)
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == model.num_params()
    assert counts.embedding == model.num_params() - model.num_params(non_embedding=True)


def test_gpt2_small_by_hand():
    c = param_counts(preset("gpt2_small"))
    # per layer: 2 LayerNorms (2 x 1536) + c_attn 768x2304+2304 + c_proj 768x768+768
    #            + c_fc 768x3072+3072 + c_proj 3072x768+768 = 7,087,872
    assert c.blocks == 12 * 7_087_872
    assert c.embedding == 50257 * 768 + 1024 * 768
    assert c.total == 124_439_808  # GPT-2 "124M"
    assert c.matmul == 124_439_808 - 1024 * 768  # nanoGPT's N: all but the position table (wte is the head)
    # 6N + 12 L T d at T = 1024: 6 x 123,653,376 + 12 x 12 x 1024 x 768
    assert flops_per_token(preset("gpt2_small"), 1024) == 741_920_256 + 113_246_208
    assert flops_per_token(preset("gpt2_small"), 1024, training=False) == (741_920_256 + 113_246_208) // 3


def test_llama_8b_by_hand():
    c = param_counts(preset("llama_8b"))
    # per layer: q,o 4096x4096 each, k,v 4096x1024 each, MLP 3 x 4096x14336, 2 RMSNorms
    per_layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert c.blocks == 32 * per_layer
    assert c.total == 8_030_261_248  # Llama-3-8B
    assert c.matmul == c.total - 128256 * 4096  # untied: the input table is the only non-matmul weight


def test_mfu_and_peaks():
    cfg = preset("gpt2_small")
    # 100k tokens/s at T = 1024 on an A100 in bf16: 1e5 x 855,166,464 / 312e12
    assert mfu(1e5, cfg, 1024, peak_flops("NVIDIA A100-SXM4-80GB")) == pytest.approx(0.274091815, rel=1e-8)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "fp32") == 51e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("NVIDIA L40S") is None  # not in the table: no guess
    assert peak_flops("NVIDIA V100-SXM2-16GB", "bf16") is None  # no bf16 on V100
    assert cpu_peak_flops(cores=2, ghz=3.0, flops_per_cycle=32) == 192e9
    with pytest.raises(ValueError, match="peak_flops=0 must be positive"):
        mfu(1.0, cfg, 1024, 0)
    with pytest.raises(ValueError, match="must be positive"):
        cpu_peak_flops(0, 3.0, 32)


def test_h100_nvl_has_its_own_peaks():
    # the NVL board's dense rates (its data sheet's sparse 1671 / 835 TFLOP/s halved); the plain "H100" pattern
    # took it for the SXM board (989e12)
    nvl = [peak_flops("NVIDIA H100 NVL", dtype) for dtype in ("bf16", "fp16", "tf32", "fp32")]
    assert nvl == [835e12, 835e12, 418e12, 60e12]
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
