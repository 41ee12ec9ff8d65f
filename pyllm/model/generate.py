"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p, stop tokens, batched
prompts of different lengths.

Prompts of different lengths are left-padded to one length P, so that every row's next token sits in
the last column and one decode step serves the whole batch. Padding never leaks into the real tokens:
pads get document id 0 and real tokens id 1 (``doc_ids``, one per key position), so attention keeps
them apart, and positions count real tokens only (cumsum of the mask - 1), so a padded row sees the
same positions as the prompt alone. The prompt is run once (prefill, filling the cache); then each
step feeds one token per row. A row stops at its first stop token (which is kept in its output);
generation ends when every row has stopped or ``max_new_tokens`` is reached.
"""

from __future__ import annotations

import torch

from pyllm import ops

from .transformer import KVCache, Transformer


def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  batch_rows: tuple[int, torch.Tensor] | None = None):
    """Draw one token per row of ``logits`` (B, V). Returns (tokens (B,) int64, logprobs (B,) fp32).

    ``temperature`` 0 is greedy (argmax; top-k/top-p are then irrelevant). ``top_k`` keeps the k most
    likely tokens; ``top_p`` keeps the smallest set of most likely tokens whose probability reaches p
    (nucleus sampling, Holtzman et al. 2020). The log-probability returned is that of the token under
    softmax(logits / temperature), before top-k/top-p truncation: what a policy-gradient method
    (PPO, GRPO) recomputes for the same token in its training forward.

    ``batch_rows=(n, rows)``: ``logits`` are rows ``rows`` of a batch of ``n``; the draw is made for the
    whole batch (placeholder rows elsewhere) and these rows kept, so each row gets the random numbers it
    would get there (``torch.multinomial`` draws row i's numbers by its place alone; tests/model check it).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32, or fp64 for fp64 models
    if temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
    logits = logits / temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    masked = logits
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        masked = masked.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = torch.softmax(masked, dim=-1).sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold at least top_p of the mass
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    if batch_rows is None:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    else:
        n, rows = batch_rows
        whole = probs.new_ones(n, probs.shape[1])
        whole[rows] = probs
        tokens = torch.multinomial(whole, 1, generator=generator).squeeze(1)[rows]
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)


def _check(model, prompts, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(model, Transformer):
        raise TypeError(f"generate: 'model' must be a pyllm Transformer, got {type(model).__name__}")
    if not prompts or any(not isinstance(p, (list, tuple)) or len(p) == 0 for p in prompts):
        raise ValueError("generate: 'prompts' must be a non-empty list of non-empty token-id lists")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be >= 0")
    if not temperature >= 0:  # (nan too)
        raise ValueError(f"generate: temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k={top_k} must be >= 1 or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p} must be in (0, 1] or None")
    vocab, context = model.cfg.vocab_size, model.cfg.max_seq_len
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"generate: prompts[{i}] has a token id outside [0, {vocab})")
        # the last new token is returned, never read back: the model reads len(p) + max_new_tokens - 1 positions
        if len(p) + max_new_tokens - 1 > context:
            raise ValueError(f"generate: prompts[{i}] has {len(p)} tokens + max_new_tokens={max_new_tokens} - 1 "
                             f"> the model's context of {context}; shorten the prompt or generate fewer tokens")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens=(),
             generator: torch.Generator | None = None, seed: int | None = None, return_logprobs: bool = False,
             batch_rows: tuple[int, list[int]] | None = None):
    """Continue each prompt by up to ``max_new_tokens`` tokens. Returns the new tokens per prompt
    (list[list[int]], a row's stop token included); with ``return_logprobs``, (tokens, logprobs) where
    logprobs[i][j] is the log-probability of tokens[i][j] (see ``sample_tokens``).

    Sampling is reproducible with ``generator`` (a torch.Generator on the model's device) or ``seed``.
    ``batch_rows=(n, rows)`` says that the prompts are rows ``rows`` of a batch of ``n`` prompts: each
    samples with the random numbers it would get in that batch (same seed), so a batch generated in parts,
    one per data-parallel process, gives the tokens it gives whole (up to rounding of the logits).
    The model runs in eval mode (no dropout) and is put back in its previous mode afterwards.
    """
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p)
    if batch_rows is not None and (len(batch_rows[1]) != len(prompts) or len(set(batch_rows[1])) != len(prompts)
                                   or not all(0 <= r < batch_rows[0] for r in batch_rows[1])):
        raise ValueError(f"generate: batch_rows must give {len(prompts)} distinct rows in [0, {batch_rows[0]}), "
                         "one per prompt")
    if max_new_tokens == 0:
        empty = [[] for _ in prompts]
        return (empty, [[] for _ in prompts]) if return_logprobs else empty
    weight = model.head_weight
    device, dtype = weight.device, weight.dtype
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    B, P = len(prompts), max(map(len, prompts))
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, P, dtype=torch.long, device=device)  # left-padded with id 0
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    real = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]  # (B, P)
    positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # pads sit at 0, real tokens at 0..len-1
    # (B, P + max_new_tokens): 0 for pads, 1 for every real (prompt or generated) token; None if unpadded
    doc_ids = torch.cat([real.long(), torch.ones(B, max_new_tokens, dtype=torch.long, device=device)], dim=1) \
        if not bool(real.all()) else None
    stops = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    rows = None if batch_rows is None else (batch_rows[0], torch.tensor(batch_rows[1], device=device))

    out_tokens, out_logprobs = [], []
    was_training = model.training
    model.eval()
    try:
        cache = KVCache.empty(model.cfg, B, P + max_new_tokens - 1, device, dtype)
        S = P
        h = model.hidden(tokens, positions, doc_ids[:, :S] if doc_ids is not None else None, cache)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            logits = ops.linear(h[:, -1], weight, backend=model.cfg.backend)  # (B, V), last position only
            nxt, logprob = sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                         generator=generator, batch_rows=rows)
            out_tokens.append(torch.where(done, -1, nxt))  # -1 marks rows that had already stopped
            out_logprobs.append(logprob)
            done |= torch.isin(nxt, stops)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            S += 1
            h = model.hidden(nxt[:, None], (lengths + step)[:, None],
                             doc_ids[:, :S] if doc_ids is not None else None, cache)
    finally:
        model.train(was_training)

    toks = torch.stack(out_tokens, dim=1).tolist()  # (B, steps)
    lps = torch.stack(out_logprobs, dim=1).tolist()
    keep = [[j for j, t in enumerate(row) if t >= 0] for row in toks]
    tokens_out = [[row[j] for j in k] for row, k in zip(toks, keep)]
    if return_logprobs:
        return tokens_out, [[row[j] for j in k] for row, k in zip(lps, keep)]
    return tokens_out
