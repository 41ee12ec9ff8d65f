"""Generation: the cached, left-padded, batched path gives the logits of a plain forward over the
whole sequence; batched equals one-by-one; greedy and seeded sampling are reproducible, and a batch
sampled in parts (``batch_rows``) gives the whole batch's tokens; stop tokens end their own row; top-k and
top-p restrict the support."""

import math

import pytest
import torch

from pyllm.model import Transformer, generate, preset, sample_tokens

FAMILIES = {
    "gpt2": dict(name="tiny", n_layer=2, d_model=32, n_head=4, vocab_size=64, max_seq_len=32),
    "llama": dict(name="tiny_llama", n_layer=2, d_model=32, n_head=4, n_kv_head=2, vocab_size=64, max_seq_len=32),
}
PROMPTS = [[5, 9, 2, 7, 1, 3], [11], [4, 4, 8]]  # different lengths: rows 2 and 3 are left-padded


def small_model(family, dtype=torch.float64):
    kw = dict(FAMILIES[family])
    return Transformer(preset(kw.pop("name"), **kw)).to(dtype).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_matches_uncached_forward(family):
    model = small_model(family)
    tokens, logprobs = generate(model, PROMPTS, 6, temperature=0, return_logprobs=True)
    for prompt, new, lps in zip(PROMPTS, tokens, logprobs):
        assert len(new) == len(lps) == 6
        seq = torch.tensor([prompt + new])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0], dim=-1)  # (len, V), no cache, no padding
        steps = logp[len(prompt) - 1:-1]  # the distribution each new token was drawn from
        assert steps.argmax(-1).tolist() == new
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64),
                                   steps.gather(1, torch.tensor(new)[:, None]).squeeze(1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_one_by_one(family):
    model = small_model(family)
    batched, batched_lp = generate(model, PROMPTS, 5, temperature=0, return_logprobs=True)
    for prompt, row, row_lp in zip(PROMPTS, batched, batched_lp):
        alone, alone_lp = generate(model, [prompt], 5, temperature=0, return_logprobs=True)
        assert alone[0] == row
        torch.testing.assert_close(torch.tensor(alone_lp[0]), torch.tensor(row_lp), rtol=1e-9, atol=1e-9)


def test_reproducible_with_seed_or_generator():
    model = small_model("llama", torch.float32)
    assert generate(model, PROMPTS, 5, temperature=0) == generate(model, PROMPTS, 5, temperature=0)
    a = generate(model, PROMPTS, 8, seed=3, top_k=20)
    assert a == generate(model, PROMPTS, 8, generator=torch.Generator().manual_seed(3), top_k=20)
    assert a != generate(model, PROMPTS, 8, seed=4, top_k=20)


def test_rows_of_a_batch_sample_what_the_whole_batch_samples():
    # a batch generated in parts (one per data-parallel process) with batch_rows: each row draws the random
    # numbers it draws in the whole batch, so the parts give the whole batch's tokens, rows that stop early
    # included; a part generated alone draws others
    model = small_model("gpt2")
    prompts = PROMPTS + [[3, 1], [7, 7, 7, 7], [2], [9, 8, 7]]
    whole, whole_lp = generate(model, prompts, 8, seed=3, top_p=0.95, stop_tokens=[5, 6], return_logprobs=True)
    assert len({len(row) for row in whole}) > 1  # some rows stopped early
    for rows in ([0, 2, 4, 6], [1, 3, 5], [5, 0], [6]):
        part, part_lp = generate(model, [prompts[r] for r in rows], 8, seed=3, top_p=0.95, stop_tokens=[5, 6],
                                 return_logprobs=True, batch_rows=(len(prompts), rows))
        assert part == [whole[r] for r in rows]
        for got, r in zip(part_lp, rows):
            torch.testing.assert_close(torch.tensor(got), torch.tensor(whole_lp[r]), rtol=1e-9, atol=1e-9)
    alone = generate(model, [prompts[r] for r in (1, 3, 5)], 8, seed=3, top_p=0.95, stop_tokens=[5, 6])
    assert alone != [whole[r] for r in (1, 3, 5)]
    with pytest.raises(ValueError, match="batch_rows must give 2 distinct rows"):
        generate(model, prompts[:2], 4, seed=3, batch_rows=(7, [1, 1]))


def test_stop_tokens_end_only_their_row():
    model = small_model("gpt2")
    free = generate(model, PROMPTS, 6, temperature=0)
    stop = free[0][2]  # row 0 will hit this at step 3 (or earlier if it appeared before)
    first = free[0].index(stop)
    out = generate(model, PROMPTS, 6, temperature=0, stop_tokens=[stop])
    assert out[0] == free[0][:first + 1]  # the stop token is kept, nothing after it
    for free_row, row in zip(free[1:], out[1:]):
        expected = free_row[:free_row.index(stop) + 1] if stop in free_row else free_row
        assert row == expected


def test_all_rows_stopping_ends_early_and_zero_tokens():
    model = small_model("gpt2")
    first = [row[0] for row in generate(model, PROMPTS, 1, temperature=0)]
    assert generate(model, PROMPTS, 10, temperature=0, stop_tokens=first) == [[t] for t in first]
    assert generate(model, PROMPTS, 0) == [[], [], []]


def test_model_mode_is_restored():
    model = small_model("gpt2").train()
    generate(model, [[1, 2]], 2)
    assert model.training


# probabilities 0.5, 0.3, 0.15, 0.05 over four tokens, the same row repeated
PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


def draws(n=4000, **kwargs):
    logits = PROBS.log().expand(n, 4)
    tokens, logprobs = sample_tokens(logits, generator=torch.Generator().manual_seed(0), **kwargs)
    return tokens, logprobs


def test_sampling_frequencies_follow_the_distribution():
    tokens, logprobs = draws()
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    torch.testing.assert_close(freq, PROBS, rtol=0, atol=0.03)
    torch.testing.assert_close(logprobs, PROBS.log()[tokens])


@pytest.mark.parametrize("kwargs, support", [
    (dict(top_k=1), {0}),
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.6), {0, 1}),
    (dict(top_p=0.85), {0, 1, 2}),
    (dict(top_p=0.4), {0}),
    (dict(top_k=3, top_p=0.6), {0, 1}),
])
def test_top_k_and_top_p_restrict_support(kwargs, support):
    tokens, logprobs = draws(**kwargs)
    assert set(tokens.tolist()) == support
    # the log-probability reported is the untruncated one (what a policy-gradient loss recomputes)
    torch.testing.assert_close(logprobs, PROBS.log()[tokens])
    if kwargs == dict(top_k=2):  # renormalised over the kept tokens: 0.5/0.8 and 0.3/0.8
        assert abs((tokens == 0).float().mean().item() - 0.625) < 0.03


def test_temperature():
    tokens, logprobs = draws(n=8, temperature=0)
    assert tokens.tolist() == [0] * 8
    tokens, logprobs = draws(temperature=2.0)  # flatter: p ~ sqrt(PROBS), renormalised
    flat = PROBS.sqrt() / PROBS.sqrt().sum()
    torch.testing.assert_close(torch.bincount(tokens, minlength=4).float() / len(tokens), flat, rtol=0, atol=0.03)
    torch.testing.assert_close(logprobs, flat.log()[tokens])


BAD = {
    "empty prompt": (dict(prompts=[[1], []]), "non-empty list of non-empty token-id lists"),
    "too long": (dict(prompts=[[1] * 30], max_new_tokens=4),
                 r"prompts\[0\] has 30 tokens \+ max_new_tokens=4 - 1 > the model's context of 32"),
    "token id": (dict(prompts=[[1, 64]]), r"prompts\[0\] has a token id outside \[0, 64\)"),
    "top_p": (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    "top_k": (dict(top_k=0), "top_k=0 must be >= 1"),
    "temperature": (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    "temperature nan": (dict(temperature=float("nan")), "temperature=nan must be >= 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments(case):
    kwargs, message = BAD[case]
    kwargs = {"prompts": [[1, 2]], "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(small_model("gpt2"), **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_full_context_is_usable(family):
    # the last new token is never read back: a prompt of context - n + 1 tokens takes n new ones, the cache
    # holding exactly the context, and the tokens are those of an uncached forward
    model = small_model(family)
    context = model.cfg.max_seq_len
    prompt = [t % 64 for t in range(context - 2)]
    new = generate(model, [prompt], 3, temperature=0)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new[:-1]]))[0]  # context positions
    assert logits[len(prompt) - 1:].argmax(-1).tolist() == new
    with pytest.raises(ValueError, match="context"):
        generate(model, [prompt], 4, temperature=0)


def test_logprob_of_greedy_token_is_max():
    model = small_model("llama")
    prompt = [1, 2, 3]
    new, logprobs = generate(model, [prompt], 3, temperature=0, return_logprobs=True)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + new[0]]))[0], dim=-1)  # (len, V), uncached
    best = logp[len(prompt) - 1:-1].max(-1).values  # the most likely token's log-probability at each step
    torch.testing.assert_close(torch.tensor(logprobs[0], dtype=torch.float64), best, rtol=1e-9, atol=1e-9)


def test_generate_under_autocast():
    # k/v from autocast (bf16) go into an fp32 cache and must come back out as q's dtype
    model = small_model("llama", torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, logprobs = generate(model, PROMPTS, 3, temperature=0, return_logprobs=True)
    assert [len(t) for t in tokens] == [3, 3, 3]
    assert all(math.isfinite(lp) for row in logprobs for lp in row)
