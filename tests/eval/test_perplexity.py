import math

import pytest
import torch

from pyllm.eval import Scorer, perplexity, rolling_windows
from pyllm.tokenizer import CharTokenizer

from .conftest import constant_model, tiny_model, uniform_model


def test_uniform_model_perplexity_is_vocab_size(tok):
    texts = ["hello world, " * 12, "x", "a b  c\n"]
    r = perplexity(uniform_model(tok.vocab_size, max_seq_len=32), tok, texts)  # the first text needs 5 windows
    assert r["nll_per_token"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert r["token_perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)
    n_bytes = sum(len(t.encode()) for t in texts)
    assert r["tokens"] == r["bytes"] == n_bytes  # byte tokenizer, ASCII text
    assert r["bits_per_byte"] == pytest.approx(math.log2(tok.vocab_size), rel=1e-6)
    words = sum(len(t.split(" ")) for t in ["hello world, " * 12]) + 1 + 4  # lm-eval counts re.split(r"\s+")
    assert r["words"] == words
    assert r["word_perplexity"] == pytest.approx(math.exp(n_bytes * math.log(tok.vocab_size) / words), rel=1e-5)


def test_perplexity_past_float_range_is_inf_not_an_error(tok):
    """A model that gives the text's tokens ~e^-30 (an untrained or diverged one) has a word perplexity of
    e^(30 x 60) for a 60-letter word: inf, while bits/byte stays a number (it raised OverflowError)."""
    r = perplexity(constant_model(tok.vocab_size, favoured=[ord("z")]), tok, ["a" * 60])
    assert r["word_perplexity"] == math.inf and 40 < r["bits_per_byte"] < 50


def test_bits_per_byte_counts_utf8_bytes_not_tokens():
    text = "héllo wörld ünïcode " * 3
    tok = CharTokenizer.from_text(text)
    r = perplexity(uniform_model(tok.vocab_size), tok, [text])
    assert r["tokens"] == len(text) < r["bytes"] == len(text.encode())
    expected = len(text) * math.log2(tok.vocab_size) / len(text.encode())
    assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("max_len,stride", [(8, None), (8, 3), (8, 1), (1, None), (5, 5)])
def test_rolling_windows_score_every_token_once_with_maximal_context(n, max_len, stride):
    tokens = list(range(100, 100 + n))
    windows = list(rolling_windows(tokens, -1, max_len, stride))
    scored = [t for ids, k in windows for t in ids[-k:]]
    assert scored == tokens  # every token exactly once, in order
    s = max_len if stride is None else stride
    full = [-1, *tokens]
    for w, (ids, k) in enumerate(windows):
        assert 1 <= k and len(ids) - 1 <= max_len
        end = full.index(ids[-1]) + 1
        assert ids == full[max(0, end - max_len - 1):end]  # contiguous, as much context as fits
        if w > 0:
            assert k <= s


def test_rolling_windows_equal_lm_eval():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(1, 38))
    for max_len in (1, 4, 10, 37, 50):
        for stride in (None, 1, 3, max_len):
            if stride is not None and stride > max_len:
                continue
            context_len = 1 if stride is None else max_len - stride + 1  # lm-eval's parametrisation
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 0, max_len, context_len)]
            ours = list(rolling_windows(tokens, 0, max_len, stride))
            assert [(ctx + cont, len(cont)) for ctx, cont in theirs] == ours


def naive_logprob(model, ids, n):
    """Sum of log p(ids[i] | ids[:i]) over the last n positions, from one plain forward pass."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double(), -1)[0]
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(ids) - n, len(ids)))


@pytest.mark.parametrize("stride", [None, 5])
def test_perplexity_of_long_document_equals_per_window_forward(tok, stride):
    model = tiny_model(tok.vocab_size, max_seq_len=16)
    text = "The rolling window covers this sentence several times over."
    ids = tok.encode(text)
    expected = sum(naive_logprob(model, w, k) for w, k in rolling_windows(ids, tok.eos_id, 16, stride))
    r = perplexity(model, tok, [text], max_len=16, stride=stride, batch_size=3)
    assert -r["nll_per_token"] * len(ids) == pytest.approx(expected, rel=1e-5)
    # a short document in one window is just the plain forward pass over eos + text
    short = "short one"
    r = perplexity(model, tok, [short], max_len=16)
    ids = [tok.eos_id, *tok.encode(short)]
    assert -r["nll_per_token"] * len(short) == pytest.approx(naive_logprob(model, ids, len(short)), rel=1e-5)


def test_scorer_shared_context_equals_independent_forward(tok):
    model = tiny_model(tok.vocab_size, max_seq_len=24)
    scorer = Scorer(model, batch_size=4)
    ctx = [tok.eos_id, *tok.encode("Question: which?")]
    conts = [tok.encode(c) for c in [" a", " bb", " a much longer"]]
    shared = scorer.choices(ctx, conts)  # context once, KV cache repeated over the choices
    for s, cont in zip(shared, conts):
        ids = (ctx + cont)[-25:]
        assert s.logprob == pytest.approx(naive_logprob(model, ids, len(cont)), rel=1e-5)
        assert s.n_tokens == len(cont)
    # longer than the context: each choice truncated on the left on its own (lm-eval's rule)
    long_ctx = [tok.eos_id, *tok.encode("x" * 30)]
    for s, cont in zip(scorer.choices(long_ctx, conts), conts):
        ids = (long_ctx + cont)[-25:]
        assert s.logprob == pytest.approx(naive_logprob(model, ids, len(cont)), rel=1e-5)


def test_bad_perplexity_input(tok):
    model = tiny_model(tok.vocab_size)
    with pytest.raises(ValueError, match="no texts"):
        perplexity(model, tok, [])
    with pytest.raises(ValueError, match="empty"):
        perplexity(model, tok, [""])
    with pytest.raises(ValueError, match="stride=9"):
        list(rolling_windows([1, 2, 3], 0, 8, 9))


def test_scorer_under_autocast(tok):
    # The Trainer calls eval_fn under autocast: the KV cache must take the autocast dtype, and the
    # head's log-softmax stays fp32. bf16 on this CPU is slow, so a 3-choice item only.
    model = tiny_model(tok.vocab_size, max_seq_len=24)
    ctx = [tok.eos_id, *tok.encode("Q: pick")]
    conts = [tok.encode(c) for c in [" a", " bb", " ccc"]]
    exact = [s.logprob for s in Scorer(model).choices(ctx, conts)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [s.logprob for s in Scorer(model).choices(ctx, conts)]
    assert low == pytest.approx(exact, rel=1e-3)  # measured <= 3e-5 on this near-uniform model
