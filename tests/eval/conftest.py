"""Tiny models with known behaviour for the evaluation tests (CPU, fp32, a byte tokenizer)."""

import pytest
import torch

from pyllm.model import Transformer, preset
from pyllm.tokenizer import ByteTokenizer


def tiny_model(vocab_size: int, max_seq_len: int = 64, **overrides) -> Transformer:
    cfg = preset("tiny", vocab_size=vocab_size, max_seq_len=max_seq_len, n_layer=2, n_head=2, d_model=32,
                 **overrides)
    return Transformer(cfg).eval()


def uniform_model(vocab_size: int, max_seq_len: int = 64) -> Transformer:
    """Tied embeddings all zero: every logit is 0, so p(token) = 1 / vocab_size everywhere."""
    model = tiny_model(vocab_size, max_seq_len)
    with torch.no_grad():
        model.wte.weight.zero_()
    return model


def constant_model(vocab_size: int, favoured: list[int], max_seq_len: int = 64) -> Transformer:
    """Whatever the input, the next token is uniform over ``favoured`` (logit 30) and ~never anything
    else: the final norm's weight is 0, so its output is its bias, and the (tied) output rows of the
    favoured tokens are that bias."""
    model = tiny_model(vocab_size, max_seq_len)
    with torch.no_grad():
        direction = torch.zeros(model.cfg.d_model)
        direction[0] = 30.0 ** 0.5
        model.norm_f.weight.zero_()
        model.norm_f.bias.copy_(direction)
        model.wte.weight[favoured] = direction
    return model


@pytest.fixture
def tok():
    return ByteTokenizer()
